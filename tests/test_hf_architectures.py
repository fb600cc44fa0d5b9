"""Architectures outside the tested families (an audit of 26): what works is checked against
PEFT or eager, what cannot work raises a clear error instead of a silently wrong result."""
import copy
import re
import warnings

import pytest
import torch

tf = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

import prefix_attn  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _build(cls, cfg, impl, seed=0):
    torch.manual_seed(seed)
    # a config object per model: transformers writes the attention implementation into it
    return cls._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()


def _pair(cls, cfg, ref_impl):
    ours = _build(cls, cfg, "prefix_attn")
    ref = _build(cls, cfg, ref_impl)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _peft_twin(ours, ref, task):
    """``ref`` wrapped by PEFT with the prefix values of our trainable prefix "a"."""
    peft = pytest.importorskip("peft")
    module = prefix_attn.prefix_tuning(ours, num_virtual_tokens=4, name="a")
    with torch.no_grad():
        module.embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
    pm = peft.get_peft_model(ref, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=4))
    pm.prompt_encoder["default"].load_state_dict(module.state_dict())
    return pm.eval()


def test_gpt_oss_attention_sinks_on_the_fallback():
    """gpt-oss passes attention sinks (s_aux): the fallback used to drop them (0.28 off eager
    without any prefix); now it applies them, with and without a prefix."""
    cfg = tf.GptOssConfig(**dict(COMMON, head_dim=8), num_local_experts=2, num_experts_per_tok=1,
                          sliding_window=64)
    ours, ref = _pair(tf.GptOssForCausalLM, cfg, "eager")
    with torch.no_grad():
        for m in (ours, ref):
            for layer in m.model.layers:
                layer.self_attn.sinks.fill_(3.0)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
        pm = _peft_twin(ours, ref, "CAUSAL_LM")
        torch.testing.assert_close(ours(ids, prefixes=["a", "a"]).logits, pm(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_roberta_positions_follow_its_padding_numbering():
    """RoBERTa numbers real tokens from padding_idx + 1 (+ the cache length): with a prefix of P
    that is padding_idx + 1 + P + i, as behind PEFT's P cached positions (was arange + P: 2.2 off)."""
    cfg = tf.RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=256, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=1)
    ours, ref = _pair(tf.RobertaModel, cfg, "sdpa")
    pm = _peft_twin(ours, ref, "FEATURE_EXTRACTION")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = cfg.pad_token_id, 0  # right padding in row 1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(input_ids=ids, attention_mask=mask, prefixes=["a", "a"]).last_hidden_state
        want = pm(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,cls,cfg,words", [
    ("bart", "BartForConditionalGeneration",
     dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
          bos_token_id=1, eos_token_id=2, decoder_start_token_id=1), "encoder-decoder"),
    # Falcon's attention goes through the interface in transformers 5.25, but its forward drops
    # the keywords (prefixes ignored under torch.compile) and ALiBi Falcon failed every forward;
    # in 5.17 it computes attention in its own code
    ("falcon", "FalconForCausalLM",
     dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
     "call of FalconForCausalLM.transformer does not pass keyword arguments|its own code"),
    ("falcon_alibi", "FalconForCausalLM",
     dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
     "call of FalconForCausalLM.transformer does not pass keyword arguments|its own code"),
    ("bloom", "BloomForCausalLM",
     dict(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0), "its own code"),
    ("deepseek_v3", "DeepseekV3ForCausalLM",
     dict(COMMON, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
          v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
          first_k_dense_replace=1, moe_intermediate_size=16), "multi-head latent attention"),
    # accepted at attach before, then failed at the first forward (or silently differed)
    ("t5_encoder", "T5EncoderModel",
     dict(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4), "relative position bias"),
    ("albert", "AlbertModel",
     dict(vocab_size=128, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
          intermediate_size=64), "have no layer index"),
    ("distilbert", "DistilBertModel",
     dict(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64), "have no layer index"),
    ("bart_causal", "BartForCausalLM",  # PEFT numbers the tokens after P; its forward cannot
     dict(vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64), "takes no position_ids"),
    ("paligemma", "PaliGemmaForConditionalGeneration",
     dict(text_config=dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, model_type="gemma", head_dim=8),
          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             image_size=8, patch_size=2, projection_dim=32),
          image_token_index=150, projection_dim=32), "numbers its positions from 1"),
    # an architecture sweep of transformers 5.25 found these accepted at attach, then wrong
    # (silently), failing at every forward, or ignoring the prefix under torch.compile
    ("stablelm", "StableLmForCausalLM", COMMON, r"call of StableLmDecoderLayer.self_attn does not pass"),
    ("git", "GitForCausalLM",
     dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
          num_attention_heads=4, max_position_embeddings=256, pad_token_id=0,
          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, image_size=8, patch_size=4)),
     r"\(GitSelfAttention\) is computed in its own code"),
    ("diffllama", "DiffLlamaForCausalLM", COMMON, "splits each value head in two"),
    ("recurrent_gemma", "RecurrentGemmaForCausalLM",
     dict(COMMON, hidden_size=64, head_dim=16, lru_width=64, attention_window_size=64,
          block_types=["recurrent", "attention"]), "restarts its recurrent layers' state"),
    ("hrm_text", "HrmTextForCausalLM",
     dict(COMMON, num_layers_per_stack=2, H_cycles=2, L_cycles=1, num_hidden_layers=8, L_bp_cycles=[1]),
     "runs its stack of layers several times"),
    ("jetmoe", "JetMoeForCausalLM", dict(COMMON, kv_channels=8, num_local_experts=4, num_experts_per_tok=2),
     "repeats its keys and values for each selected expert"),
    ("doge", "DogeForCausalLM", COMMON, "adds a mask computed from its values"),
    ("mimo_v2_flash", "MiMoV2FlashForCausalLM",
     dict(COMMON, head_dim=8, v_head_dim=4, layer_types=["full_attention", "sliding_attention"],
          sliding_window=64, mlp_layer_types=["dense", "dense"]), r"another head dim \(4\) than its keys \(8\)"),
    ("inkling_text", "InklingForCausalLM", COMMON, r"\(InklingAttention\) adds a position bias"),
    # a sweep of encoders and vision-language models (text-only) found these
    ("qwen4_exp", "Qwen4ExpForCausalLM",
     dict(COMMON, hidden_size=64, head_dim=16, layer_types=["linear_attention", "indexed_attention"],
          linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
          linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
          shared_expert_intermediate_size=32, indexer_n_heads=2, indexer_kv_heads=1,
          indexer_head_dim=16, indexer_budget=4, indexer_compress_ratio=2),
     "indexed-attention layers pick the key blocks"),
    ("kosmos2", "Kosmos2ForConditionalGeneration",
     dict(text_config=dict(vocab_size=128, embed_dim=32, layers=2, attention_heads=4, ffn_dim=64,
                           max_position_embeddings=256),
          vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, image_size=8, patch_size=4), latent_query_num=4),
     "needs image inputs at every forward"),
])
def test_models_the_bank_cannot_serve_are_refused(name, cls, cfg, words):
    if not hasattr(tf, cls):
        pytest.skip(f"{cls} is not in transformers {tf.__version__}")
    cls = getattr(tf, cls)
    try:
        config = cls.config_class(**cfg)
    except Exception as e:  # noqa: BLE001 - Qwen4-Exp's indexed attention is newer than 5.17
        # (huggingface_hub's validation error is no ValueError)
        pytest.skip(f"transformers {tf.__version__} cannot build this {cls.__name__}: {e}")
    model = _build(cls, config, "eager")
    with pytest.raises(ValueError, match=words):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")
    assert not hasattr(model, "prefix_bank")


def test_mla_without_prefix_equals_eager():
    """Keys and values of different head dims (DeepSeek's MLA) take the fallback without a
    prefix (the kernels refused them: 'k and v must have the same shape')."""
    cfg = tf.DeepseekV3Config(**dict(COMMON, num_key_value_heads=4), kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                              qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                              num_experts_per_tok=2, n_group=1, topk_group=1,
                              first_k_dense_replace=1, moe_intermediate_size=16)
    ours, ref = _pair(tf.DeepseekV3ForCausalLM, cfg, "eager")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_t5_position_bias_raises_instead_of_being_dropped():
    cfg = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=2,
                      decoder_start_token_id=0)
    model = _build(tf.T5ForConditionalGeneration, cfg, "prefix_attn")
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(NotImplementedError, match="position bias"):
        model(input_ids=ids, decoder_input_ids=ids)


def test_attention_without_a_layer_index_gets_no_prefix_and_says_so(monkeypatch):
    """DistilBERT's attention modules have no layer index (a vision tower's neither): they get
    no prefix, and a model where no layer took it raises, naming them (DistilBERT itself is
    refused at attach now: let it through to reach the forward's check)."""
    cfg = tf.DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    model = _build(tf.DistilBertModel, cfg, "prefix_attn")
    monkeypatch.setattr(prefix_attn.hf, "unsupported_model", lambda model: None)
    prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")
    with pytest.raises(RuntimeError, match="have no layer index"):
        model(input_ids=torch.randint(3, 128, (1, 5)), prefixes=["a"])


def test_llava_text_only_prefix_equals_peft():
    """LLaVA's own modeling module does not name the attention interface (its language model's
    does): it was refused as "computes attention in its own code"; now judged by the modules
    of its layers, and its text-only logits with a prefix equal PEFT's."""
    cfg = tf.LlavaConfig(text_config=tf.LlamaConfig(**dict(COMMON, vocab_size=160)),
                         vision_config=tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=2, num_attention_heads=2,
                                                           image_size=8, patch_size=2),
                         image_token_index=150)
    ours, ref = _pair(tf.LlavaForConditionalGeneration, cfg, "sdpa")
    pm = _peft_twin(ours, ref, "CAUSAL_LM")
    ids = torch.randint(3, 140, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ours(input_ids=ids, prefixes=["a", "a"]).logits,
                                   pm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_a_model_whose_source_cannot_be_read_is_not_judged_by_it(monkeypatch):
    """The attach-time reading of the model's code judges nothing it cannot read (an install
    without .py files, a frozen app): a Llama whose source is unreadable still takes a bank."""
    from prefix_attn.hf import code_checks, support

    def unreadable(obj):
        raise OSError("could not get source code")

    cached = (code_checks._class_source, code_checks._forward_tree, code_checks._calls_of,
              code_checks.passes_position_bias, support._module_uses_interface)
    model = _build(tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON), "eager")
    monkeypatch.setattr(code_checks.inspect, "getsource", unreadable)
    try:
        for f in cached:
            f.cache_clear()
        prefix_attn.PrefixBank.attach(model)  # raised "cannot attach a prefix bank" if judged
    finally:
        for f in cached:
            f.cache_clear()


def test_a_layer_loop_that_drops_keyword_arguments_is_refused():
    """The calls of a module list's members (``for layer in self.layers: layer(...)``) are
    judged too: a model whose loop passes no ``**kwargs`` would get no prefix (an error at each
    eager forward, silently none under torch.compile)."""
    from transformers.models.llama import modeling_llama

    class DroppingLlamaModel(modeling_llama.LlamaModel):
        def forward(self, input_ids=None, position_ids=None, **kwargs):
            hidden = self.embed_tokens(input_ids)
            if position_ids is None:
                position_ids = torch.arange(hidden.shape[1])[None]
            rotary = self.rotary_emb(hidden, position_ids)
            for layer in self.layers:
                hidden = layer(hidden, position_ids=position_ids, position_embeddings=rotary)
            return self.norm(hidden)

    DroppingLlamaModel.__module__ = modeling_llama.__name__  # judged as transformers' own
    model = _build(tf.LlamaForCausalLM, tf.LlamaConfig(**COMMON), "eager")
    model.model.__class__ = DroppingLlamaModel
    with pytest.raises(ValueError, match="its call of DroppingLlamaModel.layers does not pass"):
        prefix_attn.PrefixBank.attach(model)


def _got_ocr2_config():
    return tf.GotOcr2Config(
        text_config=dict(COMMON, model_type="qwen2"),
        vision_config=dict(hidden_size=16, output_channels=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=16, mlp_dim=32,
                           global_attn_indexes=[0], window_size=2))


def test_got_ocr2_whose_vision_tower_cannot_switch_takes_prefixes():
    """GOT-OCR2's vision tower refuses attn_implementation switches, so only its language model
    runs prefix_attn and its top-level config stays "eager": prefixes= was refused at every
    forward with advice that could not be followed. Judged by the language model's config now;
    its text-only logits with a prefix equal eager's with the prefix in the cache."""
    cfg = _got_ocr2_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = _build(tf.GotOcr2ForConditionalGeneration, cfg, "eager")
        ref = _build(tf.GotOcr2ForConditionalGeneration, cfg, "eager")
        ref.load_state_dict(ours.state_dict())
        module = prefix_attn.prefix_tuning(ours, num_virtual_tokens=3, name="a")
    assert ours.config._attn_implementation != "prefix_attn"  # what the tower leaves
    with torch.no_grad():
        module.embedding.weight.normal_(generator=torch.Generator().manual_seed(3))
        kv = module()  # [L, 2, Hkv, P, D]
    ids = torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = tf.DynamicCache()
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0][None].expand(2, -1, -1, -1), kv[layer, 1][None].expand(2, -1, -1, -1), layer)
    positions = torch.arange(3, 9)[None].expand(2, -1)
    with torch.no_grad():
        got = ours(input_ids=ids, prefixes=["a", "a"]).logits
        want = ref(input_ids=ids, attention_mask=torch.ones(2, 9, dtype=torch.long),
                   position_ids=positions, **{prefix_attn.hf.cache_kwarg(ref): cache}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_eurobert_keeps_its_own_numbering_behind_a_prefix_as_under_peft():
    """EuroBERT numbers its tokens 0..S-1 whatever the cache holds: behind PEFT's prefix too.
    Its tokens were numbered from P (as most models number them from the cache length): a
    silent difference from PEFT (0.3 on the hidden states)."""
    if not hasattr(tf, "EuroBertModel"):
        pytest.skip(f"transformers {tf.__version__} has no EuroBERT")
    cfg = tf.EuroBertConfig(**dict(COMMON, num_key_value_heads=4))
    ours, ref = _pair(tf.EuroBertModel, cfg, "eager")
    pm = _peft_twin(ours, ref, "FEATURE_EXTRACTION")
    ids = torch.randint(5, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, -2:], mask[1, -2:] = 0, 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pm(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(input_ids=ids, attention_mask=mask, prefixes=["a", "a"]).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4)


def test_unload_of_got_ocr2_takes_its_language_model_off_prefix_attn():
    """unload() switches a model on prefix_attn to sdpa: GOT-OCR2's top-level config stays on
    "eager" (its vision tower cannot switch), so it is judged by its language model's."""
    cfg = _got_ocr2_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _build(tf.GotOcr2ForConditionalGeneration, cfg, "eager")
        prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name="a")
    assert model.config.get_text_config()._attn_implementation == "prefix_attn"
    prefix_attn.tuning.unload(model)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_bidirectional_flag_with_a_causal_mask_equals_sdpa():
    """Gemma with use_bidirectional_attention (PaliGemma's language model): its layers say not
    causal while transformers builds a causal mask; the 2-D padding mask lost the causal part
    (4.6e-2 off sdpa on a left-padded batch, no prefix involved)."""
    from prefix_attn.tiny import tiny_config

    cfg = tiny_config("gemma")
    cfg.use_bidirectional_attention = True
    ours, ref = _pair(tf.GemmaForCausalLM, cfg, "sdpa")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # padded, unpadded given as all ones (sdpa then drops its mask: both ways), no mask
        for kw in (dict(attention_mask=mask), dict(attention_mask=torch.ones_like(ids)), {}):
            torch.testing.assert_close(ours(ids, **kw).logits, ref(ids, **kw).logits, rtol=1e-5, atol=1e-5)


def test_prefixes_with_image_inputs_are_refused():
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")
    with pytest.raises(NotImplementedError, match="pixel_values"):
        model(input_ids=torch.randint(3, 100, (1, 5)), pixel_values=torch.zeros(1, 3, 4, 4),
              prefixes=["a"])
    for key in ("input_values", "image_grid_thw", "audio_input_features"):  # were let through
        with pytest.raises(NotImplementedError, match=key):
            model(input_ids=torch.randint(3, 100, (1, 5)), prefixes=["a"], **{key: torch.zeros(1, 3)})


def test_chunked_attention_warns_at_attach():
    cfg = tf.Llama4TextConfig(**dict(COMMON, head_dim=8), intermediate_size_mlp=64, num_local_experts=2,
                              attention_chunk_size=4, no_rope_layers=[1, 0])
    model = _build(tf.Llama4ForCausalLM, cfg, "prefix_attn")
    with pytest.warns(UserWarning, match="chunked attention"):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_cross_attention_layers_get_no_prefix(family, monkeypatch):
    """A decoder with cross-attention (GPT-2 / BERT with add_cross_attention): the prefix goes
    to the self-attention only; the cross-attention over the encoder states reads none (BERT's
    module that reaches the attention function has no is_cross_attention attribute)."""
    from prefix_attn import api

    if family == "gpt2":
        cls = tf.GPT2LMHeadModel
        cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                            add_cross_attention=True, attn_pdrop=0.0, resid_pdrop=0.0,
                            embd_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    else:
        cls = tf.BertLMHeadModel
        cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=64, is_decoder=True, add_cross_attention=True,
                            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
    model = _build(cls, cfg, "prefix_attn")
    bank = prefix_attn.PrefixBank.attach(model)
    bank.add("p", torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8))
    calls = []
    real = api.prefix_attention

    def spy(q, k, v, prefix_k=None, prefix_v=None, **kw):
        calls.append((k.shape[2], prefix_k is not None))
        return real(q, k, v, prefix_k, prefix_v, **kw)

    monkeypatch.setattr(api, "prefix_attention", spy)
    ids, enc = torch.randint(3, 64, (2, 5)), torch.randn(2, 7, 32)
    with torch.no_grad():
        model(ids, encoder_hidden_states=enc, prefixes=["p", "p"])
    assert sorted(calls) == [(5, True), (5, True), (7, False), (7, False)]


def _with_prefix(family: str, P: int):
    """A tiny ``family`` model with a random fixed prefix "p" of ``P`` positions in its bank."""
    from prefix_attn.tiny import tiny_model

    model = tiny_model(family)
    bank = prefix_attn.PrefixBank.attach(model)
    bank.add("p", *torch.randn(2, bank.num_layers, bank.num_kv_heads, P, bank.head_dim))
    return model, bank


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_tokens_past_a_learned_position_table_are_a_clear_error(family):
    """Tokens after a prefix are numbered from its length: on a model with learned positions
    (GPT-2, OPT: 256 here) one token too many is a ValueError naming the table, not the
    embedding's IndexError; rotary models (Llama) run on. Left padding that keeps the real
    positions inside the table (OPT numbers them from the mask) still runs."""
    model, bank = _with_prefix(family, 20)
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 236)), prefixes=["p"])
        if family == "llama":
            model(torch.randint(3, 100, (1, 237)), prefixes=["p"])
        else:
            with pytest.raises(ValueError, match="beyond the 256 learned positions"):
                model(torch.randint(3, 100, (1, 237)), prefixes=["p"])
        if family == "opt":
            mask = torch.ones(1, 260, dtype=torch.long)
            mask[:, :30] = 0
            model(torch.randint(3, 100, (1, 260)), attention_mask=mask, prefixes=["p"])
    if family == "gpt2":
        bank.add_prompt("exact", torch.randint(3, 100, (256,)))  # fills the table: fits
        assert bank.entry_len("exact") == 256
        with pytest.raises(ValueError, match="257 tokens, more than the 256 learned positions"):
            bank.add_prompt("long", torch.randint(3, 100, (257,)))


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_right_padding_behind_a_long_prefix_runs_as_each_row_alone(family):
    """A row of a 200-position prefix and 10 tokens (positions 200..209: fits the 256 learned
    positions) right-padded to 100 beside a row of 100 tokens without a prefix: its pads were
    numbered 210..299 and the batch was refused, though each row alone runs. Each row now gets
    its output alone (the pads' positions reach only their own masked outputs)."""
    model, _ = _with_prefix(family, 200)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, 100, (10,), generator=g), torch.randint(3, 100, (100,), generator=g)
    ids = torch.zeros(2, 100, dtype=torch.long)
    ids[0, :10], ids[1] = a, b
    mask = (ids != 0).long()
    with torch.no_grad():
        want_a = model(a[None], prefixes=["p"])[0][0]
        want_b = model(b[None], prefixes=[None])[0][0]
        got = model(ids, attention_mask=mask, prefixes=["p", None])[0]
        # real tokens past the table are still refused (left padding numbers them from the cache)
        with pytest.raises(ValueError, match="beyond the 256"):
            model(ids.roll(90, 1), attention_mask=mask.roll(90, 1), prefixes=["p", None])
    torch.testing.assert_close(got[0, :10], want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_packed_sequences_past_a_learned_position_table_are_a_clear_error(family):
    """Packed rows (position ids restarting at 0) skipped the check: IndexError from the
    embedding (a device assert on CUDA) instead of the unpacked path's ValueError."""
    model, _ = _with_prefix(family, 200)
    fits = torch.cat([torch.arange(56), torch.arange(20)])[None]  # 200 + 56 = 256
    over = torch.cat([torch.arange(57), torch.arange(20)])[None]
    with torch.no_grad():
        model(torch.randint(3, 100, (1, 76)), position_ids=fits, prefixes=["p"])
        with pytest.raises(ValueError, match="beyond the 256 learned positions"):
            model(torch.randint(3, 100, (1, 77)), position_ids=over, prefixes=["p"])


@pytest.mark.parametrize("family", ["gptj", "codegen"])
def test_a_fixed_sin_cos_position_table_is_a_limit_too(family):
    """GPT-J and CodeGen index a fixed sin/cos table by position: past its end an IndexError
    (a device assert on CUDA), which the learned-table check did not see."""
    from conftest import require_attention_interface
    from prefix_attn.hf import learned_position_limit
    from prefix_attn.tiny import tiny_model

    require_attention_interface(family)
    model = tiny_model(family, n_positions=16)
    bank = prefix_attn.PrefixBank.attach(model)
    assert learned_position_limit(model) == 16
    bank.add("p", torch.randn(bank.num_layers, bank.num_kv_heads, 10, bank.head_dim),
             torch.randn(bank.num_layers, bank.num_kv_heads, 10, bank.head_dim))
    with torch.no_grad():
        model(torch.randint(3, 60, (1, 6)), prefixes=["p"])
        with pytest.raises(ValueError, match="beyond the 16 positions of its sin/cos table"):
            model(torch.randint(3, 60, (1, 7)), prefixes=["p"])
        with pytest.raises(ValueError, match="16 positions of its sin/cos table"):
            model.generate(torch.randint(3, 60, (1, 4)), prefixes=["p"], max_new_tokens=6,
                           do_sample=False, pad_token_id=0)


def test_a_vision_tower_s_positions_are_not_the_text_s_limit():
    """LLaVA with a CLIP tower (5 patch positions here): its table was taken for the text's, so
    a prefix + text longer than the patch count was refused on a rotary language model."""
    from prefix_attn.hf import cache_kwarg, learned_position_limit

    text = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, image_size=30, patch_size=15,
                  projection_dim=32)
    cfg = tf.LlavaConfig(text_config=text, vision_config=vision, image_token_id=100, pad_token_id=0)
    ours, ref = _pair(tf.LlavaForConditionalGeneration, cfg, "eager")
    assert learned_position_limit(ours) is None
    bank = prefix_attn.PrefixBank.attach(ours)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, 2, 4, 8, generator=g) for _ in range(2))
    bank.add("a", k, v)
    ids = torch.randint(3, 90, (1, 8), generator=g)
    cache = tf.DynamicCache(config=ref.config.get_text_config())
    for i in range(2):
        cache.update(k[i][None], v[i][None], i)
    with torch.no_grad():
        got = ours(ids, prefixes=["a"]).logits
        want = ref(ids, attention_mask=torch.ones(1, 12, dtype=torch.long),
                   **{cache_kwarg(ref): cache}).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_generate_past_a_learned_position_table_is_refused_up_front():
    """GPT-2 (256 learned positions), prefix 200, prompt 50: 7 new tokens use positions up to
    255 and run; 8 would fail at the step that crosses the table: refused before any forward."""
    from prefix_attn.tiny import tiny_model

    model = tiny_model("gpt2")
    bank = prefix_attn.PrefixBank.attach(model)
    bank.add("p", torch.randn(2, 4, 200, 8), torch.randn(2, 4, 200, 8))
    ids = torch.randint(3, 100, (1, 50))
    kw = dict(prefixes="p", pad_token_id=0, do_sample=False)
    assert model.generate(ids, max_new_tokens=7, **kw).shape == (1, 57)
    assert model.generate(ids, max_length=57, **kw).shape == (1, 57)
    # both given: max_new_tokens wins in transformers (max_length=100 alone would be refused)
    assert model.generate(ids, max_new_tokens=7, max_length=100, **kw).shape == (1, 57)
    # a row without a prefix (id -1) counts none, not the length of the bank's last entry
    assert model.generate(ids, prefixes=[None], max_new_tokens=8, pad_token_id=0,
                          do_sample=False).shape == (1, 58)
    calls = []
    hook = model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="generate would reach position 256 .* beyond the 256"):
        model.generate(ids, max_new_tokens=8, **kw)
    # max_length counts the prompt too (it failed mid-generation, naming "1 tokens after a cache")
    with pytest.raises(ValueError, match=r"max_length=58: 8 new tokens\).*or max_length$"):
        model.generate(ids, max_length=58, **kw)
    # settings of the model's generation config count, and a generation_config passed replaces it
    model.generation_config.max_new_tokens = 8
    with pytest.raises(ValueError, match=r"max_new_tokens=8 of the generation config\)"):
        model.generate(ids, **kw)
    hook.remove()
    assert calls == []
    from transformers import GenerationConfig

    passed = GenerationConfig(max_new_tokens=7, do_sample=False, pad_token_id=0)
    assert model.generate(ids, prefixes="p", generation_config=passed).shape == (1, 57)
    model.generation_config.max_new_tokens = None
    # without an attention mask generate infers one from the pad tokens: they are not counted
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    assert model.generate(padded, max_new_tokens=7, **kw).shape == (1, 62)
    # left padding: the real tokens count (a padded row with a longer prefix still fits)
    mask = torch.ones(2, 50, dtype=torch.long)
    mask[1, :10] = 0
    bank.add("q", torch.randn(2, 4, 205, 8), torch.randn(2, 4, 205, 8))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model.generate(torch.randint(3, 100, (2, 50)), attention_mask=mask, position_ids=pos,
                         prefixes=["p", "q"], max_new_tokens=7, pad_token_id=0, do_sample=False)
    assert out.shape == (2, 57)


def _gemma4_config(**kw):
    if not hasattr(tf, "Gemma4TextConfig"):
        pytest.skip("this transformers has no Gemma 4")
    return tf.Gemma4TextConfig(**dict(COMMON, head_dim=8, sliding_window=64, hidden_size_per_layer_input=0,
                                      layer_types=["sliding_attention", "full_attention"], **kw))


def test_layers_of_different_head_dims_are_refused():
    """Gemma 4's full-attention layers have their own head dim: reading config.head_dim raised
    transformers' AmbiguousGlobalPerLayerAttributeError (a RuntimeError: a traceback from the
    CLI); the bank holds one shape for all layers, so the model is refused by name."""
    model = _build(tf.Gemma4ForCausalLM, _gemma4_config(global_head_dim=16), "eager")
    with pytest.raises(ValueError, match=r"different head_dim \(8, 16\)"):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")


def test_layers_of_one_head_dim_on_a_per_layer_config_equal_peft():
    """The same Gemma 4 with one head dim everywhere is served, and equals PEFT."""
    ours, ref = _pair(tf.Gemma4ForCausalLM, _gemma4_config(global_head_dim=8), "sdpa")
    pm = _peft_twin(ours, ref, "CAUSAL_LM")
    ids = torch.randint(3, 120, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, prefixes=["a", "a"]).logits,
                                   pm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_layers_sharing_earlier_layers_kv_are_refused():
    """Gemma 3n's last layers reuse an earlier layer's keys and values, and under PEFT that
    layer's prefix: each layer got its own prefix here (0.14 off PEFT's logits, silently)."""
    if not hasattr(tf, "Gemma3nTextConfig"):
        pytest.skip("this transformers has no Gemma 3n")
    cfg = tf.Gemma3nTextConfig(**dict(COMMON, num_hidden_layers=4, head_dim=8, num_kv_shared_layers=2,
                                      layer_types=["sliding_attention", "full_attention"] * 2,
                                      hidden_size_per_layer_input=8, vocab_size_per_layer_input=128,
                                      laurel_rank=4, altup_num_inputs=2,
                                      activation_sparsity_pattern=[0.0] * 4))
    model = _build(tf.Gemma3nForCausalLM, cfg, "eager")
    with pytest.raises(ValueError, match="KV sharing"):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")
    assert not hasattr(model, "prefix_bank")


def test_layers_reusing_kv_by_source_are_refused():
    """Kolibri 1.1 shares KV through kv_source_layers (transformers' kv_sharing_modes says
    "reuse"), not num_kv_shared_layers: it attached without a word."""
    if not hasattr(tf, "Kolibri1_1Config"):
        pytest.skip("this transformers has no Kolibri 1.1")
    cfg = tf.Kolibri1_1Config(vocab_size=128, hidden_size=32, num_hidden_layers=10, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, moe_intermediate_size=16, num_experts=2,
                              num_experts_per_tok=1, shared_expert_intermediate_size=16,
                              mlp_only_intermediate_size=32, sliding_window=8, index_num_heads=1,
                              index_topk=8, index_pool_size=64, index_compression=16,
                              max_position_embeddings=256)
    assert "reuse" in cfg.kv_sharing_modes
    model = _build(tf.Kolibri1_1ForCausalLM, cfg, "eager")
    with pytest.raises(ValueError, match="KV sharing"):
        prefix_attn.prefix_tuning(model, num_virtual_tokens=4, name="a")


@pytest.fixture
def gpt2_with_a_long_prefix():
    """GPT-2 (256 learned positions) with a prefix of 200 and a prompt of 50 (7 new tokens fit)."""
    pytest.importorskip("transformers")
    from prefix_attn.tiny import tiny_model

    model = tiny_model("gpt2")
    bank = prefix_attn.PrefixBank.attach(model)
    bank.add("p", torch.randn(2, 4, 200, 8), torch.randn(2, 4, 200, 8))
    ids = torch.randint(3, 100, (1, 50), generator=torch.Generator().manual_seed(0))
    return model, bank, ids


@pytest.mark.hf
def test_generate_does_not_count_the_configs_pad_tokens(gpt2_with_a_long_prefix):
    """Without an attention mask generate infers one from the pad token of its generation config
    too (not only the keyword): 5 left pads + 50 tokens + 7 new fit. Kills: the config's
    pad_token_id not read (a generate that fits refused)."""
    model, _, ids = gpt2_with_a_long_prefix
    model.generation_config.pad_token_id = 0
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    assert model.generate(padded, prefixes="p", max_new_tokens=7, do_sample=False).shape == (1, 62)


@pytest.mark.hf
def test_generate_refuses_up_front_by_the_configs_max_length(gpt2_with_a_long_prefix):
    """The model's generation config's max_length counts as generate's does: 58 - 50 = 8 new
    tokens pass the table, refused before any forward. Kills: only a max_length keyword read (the
    generate then ran and failed at the step crossing the table)."""
    model, _, ids = gpt2_with_a_long_prefix
    model.generation_config.max_new_tokens = None
    model.generation_config.max_length = 58
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"max_length=58 of the generation config: 8 new tokens\)"):
        model.generate(ids, prefixes="p", pad_token_id=0, do_sample=False)
    assert calls == []


@pytest.mark.hf
def test_generate_position_check_reads_the_pinned_snapshot(gpt2_with_a_long_prefix):
    """In an outer bank.pinned() block the ids index the pinned snapshot: the position check reads
    the lengths there, not in the bank as it is now (where id 0 is now the prefix of 200).
    Kills: the check reading bank._state (a generate that fits refused)."""
    model, bank, ids = gpt2_with_a_long_prefix
    bank.add("short", torch.randn(2, 4, 10, 8), torch.randn(2, 4, 10, 8))
    bank.add("p2", *bank.get("p"))
    bank.remove("p")  # ids: short 0, p2 1
    with bank.pinned():
        bank.remove("short")  # now: p2 0
        out = model.generate(ids, prefixes="short", max_new_tokens=20, pad_token_id=0, do_sample=False)
    assert out.shape == (1, 70)


def test_generate_position_check_fills_a_passed_config_from_the_models(gpt2_with_a_long_prefix):
    """transformers (5.17, 5.25) fills a passed generation_config's None fields from the model's: the
    pad token set on the model makes 5 left pads padding (the check refused a call that fits),
    and the model's max_new_tokens=8 passes the table (the check let it start; it failed after 7
    forwards). From a mutation audit, as the tests above."""
    from transformers import GenerationConfig

    model, _, ids = gpt2_with_a_long_prefix
    model.generation_config.pad_token_id = 0
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    out = model.generate(padded, prefixes="p", generation_config=GenerationConfig(max_new_tokens=7, do_sample=False))
    assert out.shape == (1, 62)
    model.generation_config.max_new_tokens = 8
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="generate would reach position 256"):
        model.generate(ids, prefixes="p", generation_config=GenerationConfig(do_sample=False, pad_token_id=0))
    assert calls == []


@pytest.mark.parametrize("version,refused", [("5.12.1", True), ("5.0.0", True), ("4.57.6", True),
                                             ("5.15.0", False), ("5.25.0", False),
                                             ("6.0.0.dev0", False), ("5.15", False)])
def test_transformers_older_than_the_tested_floor_is_refused_at_attach(monkeypatch, version, refused):
    """The HF tests fail on transformers 5.12.1 (T5's position bias and layers of different head
    dims went unseen: a bank attached where its prefixes would be wrong) and more on 5.0.0, which
    the `hf` extra allowed (>=5.0): attaching a bank there now says to upgrade."""
    from prefix_attn.bank import PrefixBank
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama", vocab_size=32)
    import sys

    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    if refused:
        with pytest.raises(ValueError, match=rf"transformers {re.escape(version)} is older than "
                                             r"5\.15.*pip install -U 'transformers>=5\.15'"):
            PrefixBank.attach(model)
        assert getattr(model, "prefix_bank", None) is None
    else:
        assert PrefixBank.attach(model).model is model


def test_a_prompt_prefix_on_an_encoder_says_why_it_cannot_be():
    cfg = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(0)
    model = tf.AutoModelForSequenceClassification.from_config(cfg)
    bank = prefix_attn.PrefixBank.attach(model)
    with pytest.raises(RuntimeError, match="an encoder caches nothing.*prefix_tuning"):
        bank.add_prompt("sys", torch.tensor([[5, 6, 7]]))
    assert "sys" not in bank


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_tokens_after_a_cache_past_a_learned_position_table_are_a_clear_error(family):
    """The cache counts: a prefix of 1, a cache of 100 and 156 tokens pass the 256 positions
    although prefix + tokens alone fit (the read-back was skipped: the embedding's IndexError,
    a device assert on CUDA). A one-token prefix is checked too. From a mutation audit."""
    model, _ = _with_prefix(family, 1)

    def after_a_cache(n):
        with torch.no_grad():
            out = model(torch.randint(3, 100, (1, 100)), prefixes=["p"], use_cache=True)
            return model(torch.randint(3, 100, (1, n)), past_key_values=out.past_key_values,
                         prefixes=["p"], use_cache=True)

    after_a_cache(155)  # 1 + 100 + 155 = 256: fits
    with pytest.raises(ValueError, match="beyond the 256 learned positions"):
        after_a_cache(156)


def test_right_padding_after_a_cache_behind_a_long_prefix_runs_as_each_row_alone():
    """The same after a cache (a prompt fed in chunks): a row of a 150-position prefix, a cache
    of 60 and 10 new tokens right-padded to 50 (real positions 210..219: fit the 256) beside a
    row without a prefix. Prefix + new tokens alone (200) fit: the cache must count, and the
    pads are found in the mask's last 50 columns (the new tokens'), not its first."""
    model, _ = _with_prefix("gpt2", 150)
    g = torch.Generator().manual_seed(0)
    past = torch.randint(3, 100, (2, 60), generator=g)
    a, b = torch.randint(3, 100, (10,), generator=g), torch.randint(3, 100, (50,), generator=g)
    ids = torch.zeros(2, 50, dtype=torch.long)
    ids[0, :10], ids[1] = a, b
    mask = torch.cat([torch.ones(2, 60, dtype=torch.long), (ids != 0).long()], 1)

    def run(ids, mask, past, prefixes):
        with torch.no_grad():
            cache = model(past, attention_mask=mask[:, :60], prefixes=prefixes,
                          use_cache=True).past_key_values
            return model(ids, attention_mask=mask, past_key_values=cache, prefixes=prefixes,
                         use_cache=True).logits

    got = run(ids, mask, past, ["p", None])
    want_a = run(a[None], mask[:1, :70], past[:1], ["p"])
    want_b = run(b[None], mask[1:], past[1:], [None])
    torch.testing.assert_close(got[0, :10], want_a[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want_b[0], rtol=1e-4, atol=1e-4)
