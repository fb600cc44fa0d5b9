"""The architecture sweep as a regression test: causal-LM types of transformers outside the
families of prefix_attn.tiny, built tiny from their default configs. The ones an audit found
correct must stay equal to ``eager`` given the prefix in its cache (PEFT's semantics: the tokens
after the prefix numbered from P), logits and prefix gradient; the ones that cannot work must
stay refused when the bank is attached (an upgrade of transformers that changes either fails
here instead of going silently wrong). Types missing from the installed transformers skip."""
import copy
import warnings

import pytest
import torch

tf = pytest.importorskip("transformers")
pytestmark = [pytest.mark.hf, pytest.mark.more_families]

import prefix_attn  # noqa: E402
from prefix_attn.hf import cache_kwarg  # noqa: E402

P, B, S = 3, 2, 6
_SIZES = {  # config key -> tiny value (ints only)
    ("vocab_size",): 128,
    ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "embedding_size"): 64,
    ("num_attention_heads", "n_head", "num_heads", "n_heads"): 4,
    ("num_key_value_heads", "n_kv_heads", "num_kv_heads"): 2,
    ("head_dim", "kv_channels", "attention_head_dim"): 16,
    ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "intermediate_size_mlp"): 128,
    ("num_hidden_layers", "n_layer", "num_layers", "n_layers"): 2,
    ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"): 4,
    ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_experts_per_token"): 2,
    ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
     "moe_ffn_hidden_size", "shared_intermediate_size"): 32,
    ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"): 1,
    ("first_k_dense_replace",): 1,
    ("n_group", "topk_group"): 1,
    ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"): 256,
    ("sliding_window", "attention_chunk_size", "sliding_window_size"): 64,
}
_TINY = {k: v for keys, v in _SIZES.items() for k in keys}
_MAMBA = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=64, mamba_n_groups=1)
_EXTRA = {  # hybrids: one attention layer next to a recurrent / linear one, small state sizes
    "bamba": dict(num_hidden_layers=2, attn_layer_indices=[1], **_MAMBA),
    "granitemoehybrid": dict(num_hidden_layers=2, layer_types=["mamba", "attention"], **_MAMBA),
    "falcon_h1": dict(mamba_d_ssm=128, **_MAMBA),
    "jamba": dict(num_hidden_layers=2, attn_layer_offset=1, attn_layer_period=2,
                  expert_layer_offset=1, expert_layer_period=2),
    "hunyuan_v1_dense": dict(head_dim=16),
    "hunyuan_v1_moe": dict(head_dim=16),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "gemma4_text": dict(global_head_dim=16, hidden_size_per_layer_input=0),
    "zaya": dict(num_experts_per_tok=1),  # the only value its config takes
    "ministral": dict(head_dim=16, layer_types=["sliding_attention", "sliding_attention"]),
    # without KV sharing (layers reusing earlier ones' KV are refused: test_hf_architectures)
    "gemma3n_text": dict(num_hidden_layers=2, num_kv_shared_layers=0, intermediate_size=[128, 128],
                         layer_types=["sliding_attention", "full_attention"]),
    # one attention module shared by the hybrid layers (layer_idx -1 / None)
    "zamba": dict(num_hidden_layers=3, layer_types=["linear_attention", "hybrid", "hybrid"],
                  attention_head_dim=32),
    "zamba2": dict(num_hidden_layers=2, layer_types=["linear_attention", "hybrid"],
                   hybrid_layer_ids=[1], attention_head_dim=32, mamba_headdim=16),
}
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention"}


def _shrink(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, bool) or v is None:
            continue
        if k in _TINY and isinstance(v, int) and (v > 0 or k not in ("num_experts",)):
            out[k] = _TINY[k]
        elif k in ("pad_token_id", "bos_token_id", "eos_token_id") and isinstance(v, int):
            out[k] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}[k]
        elif ("dropout" in k or "pdrop" in k) and isinstance(v, float):
            out[k] = 0.0
        elif k in ("text_config", "vision_config", "audio_config") and isinstance(v, dict):
            out[k] = dict(v, **_shrink(v))
    return out


def _cut_layer_pattern(d: dict, kw: dict) -> None:
    """The first layers of ``d``'s layer pattern, up to and with an attention layer, into ``kw``."""
    pattern = d.get("layer_types")
    if isinstance(pattern, list):
        n = max(next((i + 1 for i, t in enumerate(pattern) if t in _ATTENTION_LAYERS), 2), 2)
        kw["layer_types"], kw["num_hidden_layers"] = list(pattern[:n]), n


def _config(model_type: str):
    base = tf.CONFIG_MAPPING[model_type]()
    d = base.to_dict()
    kw = _shrink(d)
    if model_type not in _EXTRA:
        _cut_layer_pattern(d, kw)
        if isinstance(d.get("text_config"), dict):
            _cut_layer_pattern(d["text_config"], kw["text_config"])
    kw.update(_EXTRA.get(model_type, {}))
    if "is_decoder" in d:
        kw["is_decoder"] = True
    return type(base)(**kw)


def _model(model_type: str):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in tf.CONFIG_MAPPING or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"transformers {tf.__version__} has no causal LM of type {model_type!r}")
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    cls = getattr(tf, name[0] if isinstance(name, (tuple, list)) else name)
    cfg = _config(model_type)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32).eval()
        ref = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager", dtype=torch.float32).eval()
    ref.load_state_dict(ours.state_dict())
    for m in (ours, ref) if model_type == "xmod" else ():
        m.set_default_language("en_XX")  # its adapters route by language; none set: it raises
    return ours, ref


def _with_prefix_in_cache(ref, ids, kv):
    """``ref``'s logits with ``kv`` [L, 2, Hkv, P, D] in the cache of its attention layers."""
    cfg = ref.config
    try:
        cache = tf.DynamicCache(config=cfg)
    except Exception:  # noqa: BLE001 - older signatures
        cache = tf.DynamicCache()
    from transformers.cache_utils import DynamicLayer

    layers = range(kv.shape[0]) if not cache.layers else \
        [i for i, layer in enumerate(cache.layers) if i < kv.shape[0] and isinstance(layer, DynamicLayer)]
    for i in layers:
        cache.update(kv[i, 0][None].expand(B, -1, -1, -1), kv[i, 1][None].expand(B, -1, -1, -1), i)
    # the tokens numbered from P by hand: a hybrid's default numbering reads the length of its
    # first layer's cache (a recurrent one: 0) in transformers 5.17
    kw = {cache_kwarg(ref): cache, "attention_mask": torch.ones(B, P + S, dtype=torch.long),
          "position_ids": (torch.arange(S) + P)[None].expand(B, -1)}
    if ref.config.model_type in _PADDING_NUMBERED:
        del kw["position_ids"]  # numbered from padding_idx + 1 + the cache's length, by the model
    return ref(input_ids=ids, **kw).logits


# RoBERTa-style: positions start after the padding index (PEFT's and prefix_attn's numbering)
_PADDING_NUMBERED = {"roberta", "roberta-prelayernorm", "camembert", "data2vec-text",
                     "xlm-roberta", "xlm-roberta-xl", "xmod"}


CORRECT = [
    "afmoe", "apertus", "arcee", "aria_text", "bitnet", "cohere2", "ctrl", "cwm", "ernie4_5",
    "ernie4_5_moe", "exaone", "falcon_h1", "flex_olmo", "gemma3", "glm", "glm4_moe", "gpt_oss",
    "granitemoe", "granitemoehybrid", "granitemoeshared", "helium", "jais2", "olmo_hybrid", "qwen3_5_text",
    "internlm3", "bamba", "lfm2", "llama4_text", "minimax_m2", "ministral3", "mllama", "nemotron_h",
    "olmo3", "olmoe", "persimmon", "phimoe", "qwen3_moe", "qwen3_next", "seed_oss", "vaultgemma",
    # swept 2026-12-06 (default configs, shrunk; moshi, equal on 5.25, is refused on 5.17,
    # whose MoshiForCausalLM does not pass keywords on to its attention)
    "apertus1p5_text", "beam", "bert", "bert-generation", "cohere2_moe", "electra", "ergo",
    "ernie", "exaone_moe", "flint", "fuyu", "got_ocr2", "gpt-sw3", "granite_swa",
    "granitemoe_swa", "hy_v3", "hyperclovax", "iquestcoder", "kolibri1", "laguna", "lara_mini",
    "lfm3", "mellum", "minicpm5_moe", "minimax_m3_vl_text", "modernbert-decoder",
    "nanochat", "param2moe", "phi4_multimodal", "qwen3_5_moe_text", "roc_bert", "sarvam_moe",
    "solar_open", "jamba", "hunyuan_v1_dense", "hunyuan_v1_moe", "lfm2_moe", "gemma4_text",
    "ministral", "gemma3n_text", "zaya",
    *sorted(_PADDING_NUMBERED),
]
REFUSED = [
    "bloom", "mpt", "falcon", "stablelm", "git", "diffllama", "recurrent_gemma", "hrm_text",
    "jetmoe", "doge", "mimo_v2_flash", "inkling_text", "deepseek_v3", "minicpm3", "xglm",
    "zamba", "zamba2",  # attached, then failed at the first forward with prefixes= (IndexError)
    "axk1", "deepseek_v2", "kimi_linear", "big_bird", "openai-gpt", "xlnet", "mamba", "rwkv",
    "inkling2_text", "hy_v4",
]


@pytest.mark.parametrize("model_type", CORRECT)
def test_swept_type_equals_eager_with_the_prefix_in_its_cache(model_type):
    ours, ref = _model(model_type)
    module = prefix_attn.prefix_tuning(ours, num_virtual_tokens=P, name="a")
    with torch.no_grad():
        module.embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
        kv = module().detach()
    vocab = ours.config.get_text_config().vocab_size
    ids = torch.randint(3, min(vocab, 120), (B, S), generator=torch.Generator().manual_seed(0))
    weights = torch.randn(B, S, vocab, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(input_ids=ids, prefixes=["a", "a"]).logits
        (got * weights).sum().backward()
        kv_ref = kv.clone().requires_grad_(True)
        want = _with_prefix_in_cache(ref, ids, kv_ref)
        (want * weights).sum().backward()
        plain = ref(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3, "the reference ignored the prefix"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the embedding [P, L * 2 * Hkv * D] gets the reference's gradient of the prefix K/V
    torch.testing.assert_close(module.embedding.weight.grad,
                               kv_ref.grad.permute(3, 0, 1, 2, 4).reshape(P, -1), rtol=1e-4, atol=1e-4)


def test_minimax_whose_lightning_attention_computes_itself_takes_a_prefix():
    """MiniMax mixes softmax attention (through the attention interface) with lightning
    attention computed in its own code: accepted (only attention computed entirely in the
    model's own code is refused), equal to eager with the prefix in its MiniMaxCache."""
    ours, ref = _model("minimax")
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    module = prefix_attn.prefix_tuning(ours, num_virtual_tokens=P, name="a")
    with torch.no_grad():
        module.embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
        kv = module()
        ids = torch.randint(3, 120, (B, S), generator=torch.Generator().manual_seed(0))
        cache = MiniMaxCache()  # layer 0 is the softmax one: the prefix goes in its cache
        cache.update(kv[0, 0][None].expand(B, -1, -1, -1), kv[0, 1][None].expand(B, -1, -1, -1), 0)
        want = ref(input_ids=ids, attention_mask=torch.ones(B, P + S, dtype=torch.long),
                   position_ids=(torch.arange(S) + P)[None].expand(B, -1),
                   **{cache_kwarg(ref): cache}).logits
        got = ours(input_ids=ids, prefixes=["a", "a"]).logits
    assert ours.config.layer_types[0] == "full_attention"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", REFUSED)
def test_swept_type_that_cannot_take_a_prefix_is_refused_at_attach(model_type):
    ours, _ = _model(model_type)
    with pytest.raises(ValueError, match="cannot attach a prefix bank"):
        prefix_attn.prefix_tuning(ours, num_virtual_tokens=P, name="a")
    assert not hasattr(ours, "prefix_bank")
