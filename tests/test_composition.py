"""Prefix tuning composed with the other tools of a fine-tuning script: PEFT's LoRA on the same
model (either order, several adapters) and accelerate's offloading."""
import warnings

import pytest
import torch

import prefix_attn
from prefix_attn.tiny import tiny_model

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.hf

IDS = torch.tensor([[5, 9, 11, 3, 7]])


def _randomized(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return module


def test_prefix_tuning_on_the_base_of_a_lora_model_keeps_lora_trainable():
    """prefix_tuning(peft_model.get_base_model()), where its refusal of the wrapper sends the
    user, froze every parameter but the prefix: the LoRA adapters silently trained nothing."""
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora_params = [p for n, p in lora.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    prefix = prefix_attn.prefix_tuning(lora.get_base_model(), 3, name="a")
    assert all(p.requires_grad for p in lora_params)
    assert all(p.requires_grad for p in prefix.parameters())
    trainable = {id(p) for p in lora_params} | {id(p) for p in prefix.parameters()}
    assert all(not p.requires_grad for p in lora.parameters() if id(p) not in trainable)
    lora.train()
    lora(input_ids=IDS, prefixes="a").logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in lora_params + list(prefix.parameters()))


def test_switching_a_lora_adapter_that_wraps_the_prefix_mlp_is_seen():
    """LoRA with target_modules="all-linear" wraps the prefix's own MLP too: after set_adapter
    (or under disable_adapter) a cached prefix of the previous adapter was served (no parameter
    changed): different logits and tokens."""
    base = tiny_model("llama")
    _randomized(prefix_attn.prefix_tuning(base, 3, name="a", projection_hidden_size=6), 1)
    cfg = dict(r=2, target_modules="all-linear", init_lora_weights=False)
    lora = peft.get_peft_model(base, peft.LoraConfig(**cfg), adapter_name="x")
    lora.add_adapter("y", peft.LoraConfig(**cfg))
    assert any(n.endswith("transform.0.lora_A") for n, _ in lora.named_modules())
    bank = lora.get_base_model().prefix_bank
    lora.eval()
    with torch.no_grad():
        lora.set_adapter("x")
        lora(input_ids=IDS, prefixes="a")
        lora.set_adapter("y")
        got = lora(input_ids=IDS, prefixes="a").logits
        with lora.disable_adapter():
            off = lora(input_ids=IDS, prefixes="a").logits
        bank.clear_cache()
        want = lora(input_ids=IDS, prefixes="a").logits
        with lora.disable_adapter():
            bank.clear_cache()
            want_off = lora(input_ids=IDS, prefixes="a").logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(off, want_off, rtol=0, atol=0)
    assert not torch.equal(got, off)


def test_unload_of_a_peft_model_unloads_its_base_model():
    """unload(peft_model) set sdpa through the wrapper but left the bank, its trainable
    prefixes and the hooks on the base model."""
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    inner = lora.get_base_model()
    prefix_attn.prefix_tuning(inner, 3, name="a")
    assert prefix_attn.unload(lora) is lora
    assert inner.config._attn_implementation == "sdpa"
    assert not hasattr(inner, "prefix_bank") and "_prefix_attn_hooks" not in inner.__dict__
    assert not any("prefix_bank" in n for n, _ in lora.named_parameters())


@pytest.mark.parametrize("projection", [None, 6])
def test_a_trainable_prefix_offloaded_by_accelerate_serves_and_saves(projection, tmp_path):
    """accelerate's hooks load offloaded weights around a module call only: the prefix read
    its weights directly, on meta ("Cannot copy out of meta tensor"), in every forward."""
    accelerate = pytest.importorskip("accelerate")
    model, ref = tiny_model("llama"), tiny_model("llama")
    for m in (model, ref):
        _randomized(prefix_attn.prefix_tuning(m, 3, name="a", projection_hidden_size=projection), 2)
    with torch.no_grad():
        want = ref(IDS, prefixes="a").logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accelerate.cpu_offload(model, execution_device="cpu")
    assert model.prefix_bank.trainable["a"].embedding.weight.is_meta
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, prefixes="a").logits, want, rtol=1e-6, atol=1e-6)
        model.prefix_bank.save_peft("a", str(tmp_path / "a"))
    ref.prefix_bank.load_peft("b", str(tmp_path / "a"))
    with torch.no_grad():
        torch.testing.assert_close(ref(IDS, prefixes="b").logits, want, rtol=1e-6, atol=1e-6)


@pytest.mark.hf
def test_an_offloaded_projected_prefix_serves_with_grad_enabled():
    """An offloaded prefix MLP called with autograd on (model(...) outside no_grad, as many
    inference scripts do): its weights are on meta, so the fused projection cannot read them.
    Kills: ``offloaded or`` dropped from rows() (the forward failed on meta weights)."""
    accelerate = pytest.importorskip("accelerate")

    model, ref = tiny_model("llama"), tiny_model("llama")
    for m in (model, ref):
        _randomized(prefix_attn.prefix_tuning(m, 3, name="a", projection_hidden_size=6), 2)
    with torch.no_grad():
        want = ref(IDS, prefixes="a").logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accelerate.cpu_offload(model, execution_device="cpu")
    model.eval()
    got = model(IDS, prefixes="a").logits
    torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.hf
def test_prefix_tuning_keeps_lora_on_the_embeddings_trainable():
    """LoRA on the input embeddings keeps its adapters in ParameterDicts (lora_embedding_A/B):
    prefix_tuning on the base leaves them trainable too. Kills: only ModuleDict adapter parts
    kept (the embedding adapters silently frozen)."""

    lora = peft.get_peft_model(tiny_model("llama"),
                               peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    emb = [p for n, p in lora.named_parameters() if "lora_embedding" in n]
    assert emb and all(p.requires_grad for p in emb)
    prefix_attn.prefix_tuning(lora.get_base_model(), 3, name="a")
    assert all(p.requires_grad for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.hf
def test_unload_of_a_peft_model_sets_the_implementation_asked_on_its_base():
    """unload(peft_model, "eager") unloads its base model with the implementation asked.
    Kills: the recursive unload dropping attn_implementation (the base got sdpa)."""

    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    inner = lora.get_base_model()
    prefix_attn.prefix_tuning(inner, 3, name="a")
    assert prefix_attn.unload(lora, "eager") is lora
    assert inner.config._attn_implementation == "eager" and not hasattr(inner, "prefix_bank")


@pytest.mark.parametrize("name, path", [("a", "prefix_bank.trainable.a"),
                                        ("train", "prefix_bank.trainable.%train")])
def test_a_prefix_in_lora_s_modules_to_save_trains_and_is_saved_with_the_adapter(tmp_path, name, path):
    """modules_to_save=["prefix_bank.trainable.a"] (how a LoRA run, TRL's peft_config= among
    them, keeps a prefix trainable and saves it in its adapter): PEFT put a wrapper in the
    bank's module dict whose copy the optimizer stepped, while the bank kept computing with the
    original, frozen one: the prefix trained nothing and the adapter held it untrained.
    A name that is a ModuleDict attribute ("train") has a "%" before it in its module path:
    the README's "prefix_bank.trainable.train" matched nothing, and PEFT froze the prefix and
    saved an adapter without it, silently. bank.module_name gives the path."""
    base = tiny_model("llama", seed=0)
    original = _randomized(prefix_attn.prefix_tuning(base, 3, name=name), 1)
    assert base.prefix_bank.module_name(name) == path
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                          modules_to_save=[base.prefix_bank.module_name(name)])
    lora = peft.get_peft_model(base, cfg)
    bank = lora.get_base_model().prefix_bank
    wrapper = bank.trainable[path.split(".")[-1]]
    copy = wrapper.modules_to_save["default"]
    start = [p.detach().clone() for p in copy.parameters()]
    opt = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.5)
    lora.train()
    for _ in range(2):
        opt.zero_grad()
        lora(input_ids=IDS, labels=IDS, prefixes=name).loss.backward()
        assert all(p.grad is not None for p in copy.parameters())
        opt.step()
    assert all(not torch.equal(p, q) for p, q in zip(copy.parameters(), start))
    lora.eval()
    with torch.no_grad():
        torch.testing.assert_close(bank.entry_kv(name), copy(), rtol=0, atol=0)
        with lora.disable_adapter():  # PEFT's switch reaches the prefix: the original one
            torch.testing.assert_close(bank.entry_kv(name), original(), rtol=0, atol=0)
        want = lora(input_ids=IDS, prefixes=name).logits
    lora.save_pretrained(str(tmp_path))
    fresh = tiny_model("llama", seed=0)
    prefix_attn.prefix_tuning(fresh, 3, name=name)
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS, prefixes=name).logits, want)
