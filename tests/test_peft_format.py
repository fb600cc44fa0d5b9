"""PEFT prefix-tuning adapters: both round trips with peft 0.21, and clear errors for bad adapters."""
import json
import os

import pytest
import torch

from prefix_attn.bank import PrefixBank
from prefix_attn.peft_format import AdapterError

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

L, HQ, HKV, D, P = 2, 4, 2, 8, 5


def _tiny_llama(layers=L, kv_heads=HKV, hidden=HQ * D, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=HQ,
                                   num_key_value_heads=kv_heads, max_position_embeddings=128)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _peft_prefix_model(base, P=P, seed=1):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    pm = peft.get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = pm.prompt_encoder["default"].embedding.weight
        w.copy_(torch.randn(w.shape, generator=g))
    return pm


def _peft_prefix_kv(pm):
    """PEFT's own per-layer prefix (get_prompt, batch 1) as [L, 2, Hkv, P, D]."""
    cache = pm.get_prompt(batch_size=1)
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = [(kv[0], kv[1]) for kv in cache]
    return torch.stack([torch.stack([k[0], v[0]]) for k, v in pairs])


def test_load_peft_reads_what_peft_saves(tmp_path):
    pm = _peft_prefix_model(_tiny_llama())
    want = _peft_prefix_kv(pm).detach()
    assert want.shape == (L, 2, HKV, P, D)
    pm.save_pretrained(str(tmp_path / "ad"))
    bank = PrefixBank.attach(_tiny_llama())
    bank.load_peft("tenant", str(tmp_path / "ad"))
    assert bank.entry_len("tenant") == P
    torch.testing.assert_close(bank.entry_kv("tenant"), want)


def test_load_peft_bin_format(tmp_path):
    pm = _peft_prefix_model(_tiny_llama())
    want = _peft_prefix_kv(pm).detach()
    pm.save_pretrained(str(tmp_path / "ad"), safe_serialization=False)
    assert os.path.isfile(tmp_path / "ad" / "adapter_model.bin")
    bank = PrefixBank.attach(_tiny_llama())
    bank.load_peft("t", str(tmp_path / "ad"))
    torch.testing.assert_close(bank.entry_kv("t"), want)


def test_save_peft_loads_in_peft_with_the_same_prefix_and_logits(tmp_path):
    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(3)
    keys, values = torch.randn(L, HKV, P, D, generator=g), torch.randn(L, HKV, P, D, generator=g)
    bank.add("mine", keys, values)
    bank.save_peft("mine", str(tmp_path / "ad"))
    assert sorted(os.listdir(tmp_path / "ad")) == ["README.md", "adapter_config.json",
                                                   "adapter_model.safetensors"]

    pm = peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "ad"))
    got = _peft_prefix_kv(pm)
    torch.testing.assert_close(got[:, 0], keys)
    torch.testing.assert_close(got[:, 1], values)

    # PEFT's logits with the adapter equal the base model's logits with that prefix as a KV cache
    from transformers import DynamicCache

    from prefix_attn.hf import cache_kwarg
    x = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        peft_logits = pm(input_ids=x).logits
        cache = DynamicCache()
        for layer in range(L):
            cache.update(keys[layer][None].clone(), values[layer][None].clone(), layer)
        base = _tiny_llama()
        ours = base(x, **{cache_kwarg(base): cache}, position_ids=torch.arange(P, P + x.shape[1])[None]).logits
    torch.testing.assert_close(peft_logits, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls, task", [("LlamaForCausalLM", "CAUSAL_LM"), ("GPT2LMHeadModel", "CAUSAL_LM"),
                                       ("Gemma3ForConditionalGeneration", "CAUSAL_LM"),
                                       ("BertModel", "FEATURE_EXTRACTION"),
                                       ("GPT2ForSequenceClassification", "FEATURE_EXTRACTION"), (None, "CAUSAL_LM")])
def test_task_type_follows_the_model_class(cls, task):
    """PEFT loads the adapters of language models (a VLM's *ForConditionalGeneration too) with
    its CAUSAL_LM wrapper, the others with its generic one."""
    from prefix_attn.peft_format import task_type_of

    assert task_type_of(None if cls is None else type(cls, (), {})()) == task


@pytest.mark.parametrize("family, task", [("bert", "FEATURE_EXTRACTION"), ("llama", "CAUSAL_LM"),
                                          ("gpt2-seq-cls", "FEATURE_EXTRACTION")])
def test_save_peft_writes_the_task_type_of_the_model(tmp_path, family, task):
    """The task type was always CAUSAL_LM: PEFT could not load the adapter of a BertModel (it
    looked for prepare_inputs_for_generation) nor a sequence classifier's. Now language models
    get CAUSAL_LM and the others PEFT's generic wrapper, and PEFT gives our outputs."""
    from prefix_attn.tiny import tiny_model

    def build(impl):
        if family == "gpt2-seq-cls":
            cfg = tiny_model("gpt2").config
            cfg.num_labels, cfg.pad_token_id = 3, 0
            torch.manual_seed(0)
            return transformers.GPT2ForSequenceClassification._from_config(
                cfg, attn_implementation=impl).eval()
        return tiny_model(family, attn_implementation=impl).eval()

    model = build("prefix_attn")
    bank = PrefixBank.attach(model)
    g = torch.Generator().manual_seed(4)
    shape = (bank.num_layers, bank.num_kv_heads, 3, bank.head_dim)
    bank.add("a", torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    bank.save_peft("a", str(tmp_path / "ad"))
    assert json.load(open(tmp_path / "ad" / "adapter_config.json"))["task_type"] == task
    pm = peft.PeftModel.from_pretrained(build("eager"), str(tmp_path / "ad")).eval()
    ids = torch.randint(3, 60, (2, 6), generator=g)
    with torch.no_grad():
        ours, theirs = model(ids, prefixes=["a", "a"]), pm(input_ids=ids)
    key = "logits" if hasattr(ours, "logits") else "last_hidden_state"
    torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), rtol=1e-4, atol=1e-5)
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file; give a folder"):
        bank.save_peft("a", str(tmp_path / "afile"))


def test_save_peft_folds_a_trainable_entry(tmp_path):
    class Learned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = torch.nn.Parameter(torch.randn(L, 2, HKV, 3, D))

        def forward(self):
            return torch.tanh(self.base) * 2

    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    mod = Learned()
    bank.add_trainable("t", mod)
    bank.save_peft("t", str(tmp_path / "ad"))
    bank.load_peft("folded", str(tmp_path / "ad"))
    torch.testing.assert_close(bank.entry_kv("folded"), mod().detach())


def _write_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def good_adapter(tmp_path):
    bank = PrefixBank.attach(_tiny_llama())
    bank.add("x", torch.randn(L, HKV, P, D), torch.randn(L, HKV, P, D))
    bank.save_peft("x", str(tmp_path / "ad"))
    return tmp_path / "ad"


@pytest.mark.parametrize("change, error, pattern", [
    ({"num_layers": 3}, AdapterError, r"adapter_config.json: num_layers=3 but this model needs num_layers=2 \(2 layers"),
    ({"num_attention_heads": 4}, AdapterError, r"num_attention_heads=4 but this model needs num_attention_heads=2 \(2 key/value heads"),
    ({"token_dim": 32}, AdapterError, r"token_dim=32 but this model needs token_dim=16 \(2 key/value heads x head dim 8"),
    ({"peft_type": "LORA"}, AdapterError, r"peft_type is 'LORA', expected 'PREFIX_TUNING'"),
    ({"num_transformer_submodules": 2}, AdapterError, r"num_transformer_submodules=2 \(encoder-decoder"),
    ({"num_virtual_tokens": 7}, AdapterError, r"adapter_model.safetensors: prompt_embeddings has shape \[5, 64\], "
                                               r"expected \[P=7"),
    # not integers: a raw TypeError / int()'s message naming neither file nor field, or a
    # float truncated and accepted
    ({"num_layers": [2]}, AdapterError, r"adapter_config.json: field 'num_layers' must be an integer, got \[2\]"),
    ({"num_virtual_tokens": "four"}, AdapterError, r"field 'num_virtual_tokens' must be an integer, got 'four'"),
    ({"num_attention_heads": 2.5}, AdapterError, r"field 'num_attention_heads' must be an integer, got 2.5"),
    ({"token_dim": True}, AdapterError, r"field 'token_dim' must be an integer, got True"),
    ({"num_transformer_submodules": "1"}, AdapterError, r"field 'num_transformer_submodules' must be"),
])
def test_mismatched_config_is_rejected_and_bank_unchanged(good_adapter, change, error, pattern):
    bank = PrefixBank.attach(_tiny_llama())
    bank.add("keep", torch.zeros(L, HKV, 1, D), torch.zeros(L, HKV, 1, D))
    version = bank.version
    _write_config(good_adapter, **change)
    with pytest.raises(error, match=pattern):
        bank.load_peft("keep", str(good_adapter))
    assert bank.names() == ["keep"] and bank.version == version and bank.entry_len("keep") == 1


def test_adapter_for_another_model(tmp_path):
    """A real PEFT adapter trained for a model with other dims (3 layers, 4 kv heads) is refused."""
    pm = _peft_prefix_model(_tiny_llama(layers=3, kv_heads=4))
    pm.save_pretrained(str(tmp_path / "other"))
    bank = PrefixBank.attach(_tiny_llama())
    with pytest.raises(AdapterError, match="for another model"):
        bank.load_peft("o", str(tmp_path / "other"))
    assert bank.names() == []


def test_missing_and_corrupt_files(good_adapter, tmp_path):
    bank = PrefixBank.attach(_tiny_llama())
    with pytest.raises(FileNotFoundError, match="not found"):
        bank.load_peft("a", str(tmp_path / "nowhere"))
    weights = good_adapter / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="adapter_model.safetensors: corrupt"):
        bank.load_peft("a", str(good_adapter))
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        bank.load_peft("a", str(good_adapter))
    (good_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: not a readable JSON"):
        bank.load_peft("a", str(good_adapter))
    (good_adapter / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        bank.load_peft("a", str(good_adapter))
    assert bank.names() == []


def test_wrong_tensor_key(good_adapter):
    from safetensors.torch import save_file
    save_file({"something_else": torch.zeros(P, 64)}, str(good_adapter / "adapter_model.safetensors"))
    bank = PrefixBank.attach(_tiny_llama())
    with pytest.raises(AdapterError, match=r"no tensor 'prompt_embeddings' \(found \['something_else'\]\)"):
        bank.load_peft("a", str(good_adapter))


def test_load_peft_of_a_projected_prefix_reads_the_folded_kv(tmp_path):
    """PEFT saves a prefix_projection=True adapter (trained with an MLP) folded to [P, L*2*Hkv*D]."""
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                  encoder_hidden_size=12)
    pm = peft.get_peft_model(_tiny_llama(), cfg)
    want = _peft_prefix_kv(pm).detach()
    pm.save_pretrained(str(tmp_path / "ad"))
    bank = PrefixBank.attach(_tiny_llama())
    bank.load_peft("proj", str(tmp_path / "ad"))
    torch.testing.assert_close(bank.entry_kv("proj"), want)


@pytest.mark.hf
def test_peft_adapter_on_a_sliding_window_model_warns(tmp_path):
    """PEFT's prefix is windowed out (it sits in the KV cache), ours never: loading a PEFT adapter
    into a sliding-window model says when the logits differ from PEFT's."""
    import warnings

    from prefix_attn.tiny import tiny_model

    model = tiny_model("mistral")  # window 4
    bank = PrefixBank.attach(model)
    cfg = model.config
    D = cfg.hidden_size // cfg.num_attention_heads
    bank.add("x", torch.randn(2, 2, 3, D), torch.randn(2, 2, 3, D))
    bank.save_peft("x", str(tmp_path / "ad"))
    with pytest.warns(UserWarning, match=r"load_peft\('y'\): MistralForCausalLM has sliding-window"):
        bank.load_peft("y", str(tmp_path / "ad"))
    llama = PrefixBank.attach(tiny_model("llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama.load_peft("y", str(tmp_path / "ad"))


def test_a_folder_of_several_adapters_names_its_subfolders(tmp_path):
    bank = PrefixBank.attach(_tiny_llama())
    bank.add("x", torch.randn(L, HKV, P, D), torch.randn(L, HKV, P, D))
    for name in ("task_a", "task_b"):
        bank.save_peft("x", str(tmp_path / "multi" / name))
    with pytest.raises(FileNotFoundError, match=r"subfolders \(task_a, task_b"):
        bank.load_peft("y", str(tmp_path / "multi"))


def test_save_peft_warns_when_a_head_trained_beside_the_prefix_is_left_out(tmp_path):
    """A classification head unfrozen beside the prefix (PEFT's modules_to_save) is not in the
    adapter save_peft writes: PEFT's from_pretrained then got the untrained head, silently."""
    import warnings

    import prefix_attn

    model = _tiny_llama()
    prefix_attn.prefix_tuning(model, num_virtual_tokens=3, name="a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.prefix_bank.save_peft("a", str(tmp_path / "frozen"))  # only the prefix trains
    model.lm_head.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"wrote the prefix only.*\(lm_head.weight\)"):
        model.prefix_bank.save_peft("a", str(tmp_path / "head"))


def _old_style_adapter(folder, emb, config):
    from safetensors.torch import save_file

    os.makedirs(folder)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    save_file({"prompt_embeddings": emb}, os.path.join(folder, "adapter_model.safetensors"))


@pytest.mark.hf
def test_an_old_multi_query_gpt_bigcode_adapter_loads_as_its_peft_served_it(tmp_path):
    """PEFT under a transformers whose GPTBigCodeConfig had no num_key_value_heads (4.46)
    saved a multi-query model's prefix with every query head (num_attention_heads = n_head,
    token_dim = n_head * D) and served head 0 of each layer (its
    starcoder_model_postprocess_past_key_value); today's PEFT cannot load such an adapter and
    load_peft refused it as one "for another model". It loads now, as head 0 with a warning
    (an audit compared the logits with peft 0.13.2 + transformers 4.46.3: 3e-7)."""
    from prefix_attn.tiny import tiny_model

    model = tiny_model("gpt_bigcode", vocab_size=64).eval()
    L, H, D, P = 2, model.config.num_attention_heads, 8, 5
    bank = PrefixBank.attach(model)
    assert (bank.num_layers, bank.num_kv_heads, bank.head_dim) == (L, 1, D) and H == 4
    emb = torch.randn(P, L * 2 * H * D, generator=torch.Generator().manual_seed(0))
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P,
              "num_layers": L, "num_attention_heads": H, "token_dim": H * D,
              "num_transformer_submodules": 1, "prefix_projection": False}
    _old_style_adapter(str(tmp_path / "old"), emb, config)
    with pytest.warns(UserWarning, match="head 0 of each layer only"):
        model.prefix_bank.load_peft("old", str(tmp_path / "old"))
    head0 = emb.view(P, L, 2, H, D)[:, :, :, 0].permute(1, 2, 0, 3)  # [L, 2, P, D]
    keys, values = model.prefix_bank.get("old")
    torch.testing.assert_close(keys[:, 0], head0[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(values[:, 0], head0[:, 1], rtol=0, atol=0)
    model.prefix_bank.add("head0", head0[:, 0, None], head0[:, 1, None])
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prefixes="old").logits,
                                   model(ids, prefixes="head0").logits, rtol=0, atol=0)

    # a llama (query heads != kv heads, not multi-query) keeps refusing such a file, naming
    # what PEFT's num_attention_heads counts
    llama = tiny_model("llama", vocab_size=64)
    lb = PrefixBank.attach(llama)
    Ll, Hkv, Dl = lb.num_layers, lb.num_kv_heads, lb.head_dim
    Hq = llama.config.num_attention_heads
    assert Hq != Hkv
    _old_style_adapter(str(tmp_path / "gqa"), torch.randn(P, Ll * 2 * Hq * Dl),
                       dict(config, num_layers=Ll, num_attention_heads=Hq, token_dim=Hq * Dl))
    with pytest.raises(AdapterError, match=rf"num_attention_heads={Hq} but this model needs "
                                           rf"num_attention_heads={Hkv} \({Hkv} key/value heads"):
        llama.prefix_bank.load_peft("gqa", str(tmp_path / "gqa"))


def test_load_peft_trainable_continues_training_a_saved_adapter(tmp_path):
    """PEFT's ``is_trainable=True`` (which PEFT 0.21 refuses for prompt learning): a saved
    adapter comes back as a trainable prefix, the base frozen, and the next step equals the
    one the original model would take."""
    import prefix_attn

    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    first = _tiny_llama()
    first.set_attn_implementation("prefix_attn")
    prefix_attn.prefix_tuning(first, num_virtual_tokens=P, projection_hidden_size=16, name="t")
    first.prefix_bank.save_peft("t", str(tmp_path))
    second = _tiny_llama()
    second.set_attn_implementation("prefix_attn")
    PrefixBank.attach(second).load_peft("t", str(tmp_path), trainable=True)
    assert second.prefix_bank.kind("t") == "trainable"
    trained = prefix_attn.trainable_parameters(second)
    assert [n for n, p in second.named_parameters() if p.requires_grad] == [
        f"{second.prefix_bank.module_name('t')}.embedding.weight"]
    assert trained[0].dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(second.prefix_bank.entry_kv("t"), first.prefix_bank.entry_kv("t"))
    la = first(input_ids=ids, labels=ids, prefixes="t").loss
    lb = second(input_ids=ids, labels=ids, prefixes="t").loss
    torch.testing.assert_close(lb, la)
    lb.backward()
    assert trained[0].grad is not None and trained[0].grad.abs().sum() > 0
    # a name already in the bank is refused (an optimizer may hold its parameters)
    with pytest.raises(ValueError, match="already in the bank"):
        second.prefix_bank.load_peft("t", str(tmp_path), trainable=True)


def test_load_peft_trainable_refuses_a_model_on_meta(tmp_path):
    """A model not loaded yet (built on meta): load_peft(trainable=True) added a prefix whose
    parameters were on meta, the adapter's values dropped (as a fixed entry and load_prefixes
    refuse to)."""
    model = _tiny_llama()
    PrefixBank.attach(model).add("t", *torch.randn(2, L, HKV, P, D))
    model.prefix_bank.save_peft("t", str(tmp_path))
    with torch.device("meta"):
        empty = _tiny_llama()
    bank = PrefixBank.attach(empty)
    with pytest.raises(ValueError, match="on meta"):
        bank.load_peft("t", str(tmp_path), trainable=True)
    assert "t" not in bank and all(p.requires_grad for p in empty.parameters())


def test_load_peft_of_a_whole_model_folder_says_to_use_load_prefixes(tmp_path):
    """PEFT muscle memory: ``model.save_pretrained(dir)`` after prefix tuning writes the whole
    model; loading that folder as an adapter says where its prefixes are read from."""
    import prefix_attn

    model = _tiny_llama()
    model.set_attn_implementation("prefix_attn")
    prefix_attn.prefix_tuning(model, num_virtual_tokens=P, name="t")
    model.save_pretrained(str(tmp_path))
    other = _tiny_llama()
    other.set_attn_implementation("prefix_attn")
    with pytest.raises(FileNotFoundError, match=r"whole model .*load_prefixes\(model, dir\)"):
        PrefixBank.attach(other).load_peft("t", str(tmp_path))
    assert prefix_attn.load_prefixes(other, str(tmp_path)) == ["t"]


def test_load_peft_trainable_needs_a_bank_on_a_model(tmp_path):
    """A bank of its own (PrefixBank(L, Hkv, D)) has no base to freeze: trainable=True is
    refused with the way to do it, and the bank is unchanged."""
    model = _tiny_llama()
    PrefixBank.attach(model).add("t", *torch.randn(2, L, HKV, P, D))
    model.prefix_bank.save_peft("t", str(tmp_path))
    bank = PrefixBank(L, HKV, D)
    with pytest.raises(RuntimeError, match=r"needs a bank attached to a model.*attach\(model\)"):
        bank.load_peft("t", str(tmp_path), trainable=True)
    assert "t" not in bank
    bank.load_peft("t", str(tmp_path))
    assert bank.kind("t") == "fixed"


def test_load_peft_trainable_keeps_a_float64_adapter_in_float64(tmp_path):
    """An adapter saved from a float64 model: its trainable prefix keeps float64 (as
    prefix_tuning's on such a model), not float32 rounding of the saved values."""
    model = _tiny_llama().double()
    kv = torch.randn(2, L, HKV, P, D, dtype=torch.float64)
    PrefixBank.attach(model).add("t", *kv)
    model.prefix_bank.save_peft("t", str(tmp_path))
    second = _tiny_llama().double()
    PrefixBank.attach(second).load_peft("t", str(tmp_path), trainable=True)
    (weight,) = [p for p in second.parameters() if p.requires_grad]
    assert weight.dtype == torch.float64
    with torch.no_grad():
        assert torch.equal(second.prefix_bank.entry_kv("t"), model.prefix_bank.entry_kv("t"))


def test_save_peft_writes_a_model_card_as_peft_does_and_keeps_one_there(tmp_path):
    """PEFT's save_pretrained writes README.md with library_name peft and the base model (the
    Hub lists the folder as an adapter of it by them); save_peft wrote none. A card already in
    the folder (the user's) is kept."""
    import yaml

    model = _tiny_llama()
    model.config._name_or_path = "org/base-7b"
    bank = PrefixBank.attach(model)
    shape = (bank.num_layers, bank.num_kv_heads, 3, bank.head_dim)
    bank.add("a", torch.randn(shape), torch.randn(shape))
    bank.save_peft("a", str(tmp_path / "ad"))
    text = (tmp_path / "ad" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/base-7b"
    assert meta["pipeline_tag"] == "text-generation" and "prefix-tuning" in meta["tags"]
    assert "3 virtual tokens for each of 2 layers (2 key/value heads of 8 dims)" in text
    assert "load_peft" in text and "PeftModel.from_pretrained" in text
    (tmp_path / "ad" / "README.md").write_text("my card")
    bank.save_peft("a", str(tmp_path / "ad"))
    assert (tmp_path / "ad" / "README.md").read_text() == "my card"
    peft.PeftModel.from_pretrained(_tiny_llama(), str(tmp_path / "ad"))  # loads beside a card


def test_save_peft_replaces_the_card_it_wrote_for_another_adapter(tmp_path):
    """A second save_peft into the folder (another prefix, here 5 then 3 virtual tokens) kept
    the first save's card, which went on describing 5 virtual tokens beside a 3-token adapter;
    the card it wrote is replaced, one the user edited is still kept."""
    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    for name, P in (("five", 5), ("three", 3)):
        shape = (bank.num_layers, bank.num_kv_heads, P, bank.head_dim)
        bank.add(name, torch.randn(shape), torch.randn(shape))
    card = tmp_path / "ad" / "README.md"
    bank.save_peft("five", str(tmp_path / "ad"))
    assert "5 virtual tokens" in card.read_text()
    bank.save_peft("three", str(tmp_path / "ad"))
    assert "3 virtual tokens" in card.read_text() and "5 virtual tokens" not in card.read_text()
    card.write_text(card.read_text() + "\nTrained on our support tickets.\n")
    bank.save_peft("five", str(tmp_path / "ad"))
    assert card.read_text().endswith("Trained on our support tickets.\n") and "3 virtual tokens" in card.read_text()


def test_the_model_card_says_only_what_is_known_and_quotes_the_base_model(tmp_path):
    """(Added by the mutation audit.) No base model known: no base_model line (not "null"); a
    base model path YAML would misread (": ", " #") is quoted; pipeline_tag text-generation only
    for CAUSAL_LM, as PEFT's card (PeftModelForCausalLM only); the task type in the text."""
    import yaml

    from prefix_attn.peft_format import model_card

    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    shape = (bank.num_layers, bank.num_kv_heads, 3, bank.head_dim)
    bank.add("a", torch.randn(shape), torch.randn(shape))
    bank.save_peft("a", str(tmp_path / "ad"))
    config = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert not config.get("base_model_name_or_path")
    meta = yaml.safe_load((tmp_path / "ad" / "README.md").read_text().split("---")[1])
    assert "base_model" not in meta and meta["library_name"] == "peft"

    card = model_card(dict(config, base_model_name_or_path="/models/base: v2 #1"))
    assert yaml.safe_load(card.split("---")[1])["base_model"] == "/models/base: v2 #1"
    assert "A PEFT prefix-tuning adapter (CAUSAL_LM): 3 virtual tokens" in card
    card = model_card(dict(config, task_type="SEQ_2_SEQ_LM"))
    assert "pipeline_tag" not in yaml.safe_load(card.split("---")[1])
    assert "A PEFT prefix-tuning adapter (SEQ_2_SEQ_LM): 3 virtual tokens" in card


def test_save_peft_moves_the_config_in_last(tmp_path, monkeypatch):
    """(Added by the mutation audit.) Readers do not lock: a loader that finds the new config
    must find the new weights already in place, so the config is the last file moved in
    (the card, then the weights, then the config)."""
    model = _tiny_llama()
    bank = PrefixBank.attach(model)
    shape = (bank.num_layers, bank.num_kv_heads, 3, bank.head_dim)
    bank.add("a", torch.randn(shape), torch.randn(shape))
    real, moved = os.replace, []

    def replace(src, dst, *a, **k):
        moved.append(os.path.basename(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)
    bank.save_peft("a", str(tmp_path / "ad"))
    assert moved == ["README.md", "adapter_model.safetensors", "adapter_config.json"]
    moved.clear()
    bank.save_peft("a", str(tmp_path / "ad"))  # the card an earlier save wrote is replaced
    assert moved == ["README.md", "adapter_model.safetensors", "adapter_config.json"]
    moved.clear()
    (tmp_path / "ad" / "README.md").write_text("my card\n")
    bank.save_peft("a", str(tmp_path / "ad"))  # a card of the user's is kept
    assert moved == ["adapter_model.safetensors", "adapter_config.json"]
    assert (tmp_path / "ad" / "README.md").read_text() == "my card\n"
