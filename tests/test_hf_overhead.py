"""The host-side caches of the decode path (bench/bench_hf_overhead.py): the "no prefix"
stand-ins of `normalize` and a selection's per-layer views are reused while they are the
same, and made afresh when the call differs (shape, dtype, inference mode, tracing, a new
prefix tensor, a trainable one)."""
import torch
import pytest

from prefix_attn import prefix_attention
from prefix_attn.selection import PrefixSelection
from prefix_attn.validation import normalize


def _qkv(B=2, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 4, 1, 8, generator=g, dtype=dtype)
    k = torch.randn(B, 2, 5, 8, generator=g, dtype=dtype)
    v = torch.randn(B, 2, 5, 8, generator=g, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def test_no_prefix_stand_ins_are_reused_for_the_same_call_shape():
    a, b = normalize(*_qkv()), normalize(*_qkv())
    assert a.prefix_k is b.prefix_k and a.prefix_ids is b.prefix_ids and a.prefix_lens is b.prefix_lens
    assert a.prefix_k.shape == (1, 2, 0, 8) and a.prefix_ids.tolist() == [0, 0]
    assert a.prefix_lens.tolist() == [0]


@pytest.mark.parametrize("other", ["batch", "dtype", "inference"])
def test_no_prefix_stand_ins_follow_batch_dtype_and_inference_mode(other):
    base = normalize(*_qkv())
    if other == "batch":
        got = normalize(*_qkv(B=3))
        assert got.prefix_ids.shape == (3,)
    elif other == "dtype":
        got = normalize(*_qkv(dtype=torch.float64))
        assert got.prefix_k.dtype == torch.float64
    else:
        with torch.inference_mode():
            got = normalize(*_qkv())
        assert got.prefix_ids.is_inference()
    assert got.prefix_k is not base.prefix_k and got.prefix_ids is not base.prefix_ids


def test_no_prefix_after_inference_mode_still_differentiates():
    """Inference tensors cannot be saved for backward: a stand-in made under inference_mode
    must not be handed to a later call that records autograd."""
    with torch.inference_mode():
        prefix_attention(*_qkv())
    q, k, v = _qkv(requires_grad=True)
    prefix_attention(q, k, v).sum().backward()
    assert q.grad is not None and torch.isfinite(k.grad).all()


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_no_prefix_stand_ins_are_not_kept_from_a_trace():
    """torch.jit.trace records the stand-ins' creation (a batch size of its own), not cached
    tensors of the traced batch size."""
    q, k, v = _qkv()
    traced = torch.jit.trace(lambda q, k, v: prefix_attention(q, k, v, backend="torch"), (q, k, v))
    q3, k3, v3 = _qkv(B=3)
    torch.testing.assert_close(traced(q3, k3, v3), prefix_attention(q3, k3, v3, backend="torch"))


def _selection(kv):
    return PrefixSelection(kv, torch.zeros(2, dtype=torch.long), torch.tensor([3]), ["a"], 0)


def test_selection_layer_views_are_made_once_per_prefix_tensor():
    sel = _selection(torch.randn(2, 2, 1, 2, 3, 8))
    pk, pv = sel.layer(1)
    assert sel.layer(1)[0] is pk and sel.layer(1)[1] is pv
    torch.testing.assert_close(pk, sel._kv[1, 0])
    torch.testing.assert_close(pv, sel._kv[1, 1])
    sel._kv = torch.randn(2, 2, 1, 2, 3, 8)  # a new tensor (hooks._pad_short replaces it)
    pk2, _ = sel.layer(1)
    assert pk2 is not pk
    torch.testing.assert_close(pk2, sel._kv[1, 0])
    with pytest.raises(IndexError, match="layer_idx 2 out of range"):
        sel.layer(2)


def test_selection_layer_views_of_a_trainable_prefix_carry_its_graph():
    kv = torch.randn(2, 2, 1, 2, 3, 8, requires_grad=True)
    sel = _selection(kv * 2)
    with torch.no_grad():
        sel.layer(0)  # a view made without grad must not be reused with grad
    pk, pv = sel.layer(0)
    assert pk.grad_fn is not None
    (pk.sum() + pv.sum()).backward()
    assert kv.grad[0].eq(2).all() and kv.grad[1].eq(0).all()


def test_output_attentions_is_read_from_the_call_then_the_config():
    """The fallback reason reads output_attentions from the call's kwargs first, else the
    module's config (transformers 5 keeps it behind a property, older ones as a plain field)."""
    from types import SimpleNamespace

    from prefix_attn.hf.attention import _fallback_reason
    from prefix_attn.tiny import tiny_config

    q, k, v = _qkv()
    cfg = tiny_config("llama")
    module = torch.nn.Module()
    module.config = cfg
    assert _fallback_reason(module, q, v, 0.0, {}) is None
    cfg.__dict__["_output_attentions"] = True  # the setter refuses a non-eager model
    assert _fallback_reason(module, q, v, 0.0, {}) == "output_attentions"
    assert _fallback_reason(module, q, v, 0.0, {"output_attentions": False}) is None
    module.config = SimpleNamespace(output_attentions=True)
    assert _fallback_reason(module, q, v, 0.0, {}) == "output_attentions"
    module.__dict__.pop("config", None)
    assert _fallback_reason(module, q, v, 0.0, {}) is None


def test_get_backend_answers_from_the_availability_cache(monkeypatch):
    """A call naming its backend (backend="triton", $PREFIX_ATTN_BACKEND) looks it up in
    available_backends()' cache, not through is_available() (an environment read and, for
    triton on a GPU, a CUDA query per call); unavailable names still fail as before."""
    from prefix_attn.backends import available_backends, get_backend
    b = get_backend("torch")
    calls = []
    monkeypatch.setattr(b, "is_available", lambda: calls.append(1) or True)
    assert get_backend("torch") is b and calls == []
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("nope")
    if "cuda" not in available_backends():
        with pytest.raises(RuntimeError, match="'cuda' is not available on this machine"):
            get_backend("cuda")
