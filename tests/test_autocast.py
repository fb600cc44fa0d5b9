"""`prefix_attention` under `torch.autocast`, the usual mixed-precision training set-up: float32
q/k (RoPE returns float32), a half-precision v and float32 trainable prefixes are cast to the
autocast dtype as autocast does for SDPA, the kernels run with autocast off (forward and a
backward called inside the region), and gradients come back in each input's own dtype."""
import os

import pytest
import torch

import prefix_attn
from prefix_attn import prefix_attention
from conftest import make_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# the Triton interpreter cannot compute bfloat16: it runs under an fp16 autocast
BACKENDS = [("torch", torch.bfloat16), ("cpu", torch.bfloat16), ("torch", torch.float16),
            pytest.param("triton", torch.float16, marks=pytest.mark.interpreter)]


def _mixed_inputs(half, seed=0):
    """q, k, prefix float32; v in `half` (what a Llama layer hands over under autocast)."""
    (q, k, v, pk, pv), kw = make_inputs(B=3, Hq=4, Hkv=2, Sq=6, Skv=11, N=2, P=5, lens=[5, 2],
                                        ids=[1, 0, 1], pad="left", seed=seed)
    return [q, k, v.to(half), pk, pv], kw


@pytest.mark.parametrize("backend,half", BACKENDS)
def test_autocast_equals_explicit_casts(backend, half):
    if backend not in prefix_attn.available_backends():
        pytest.skip(f"{backend} backend not available")
    inputs, kw = _mixed_inputs(half)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", dtype=half):
        out = prefix_attention(*leaves, backend=backend, **kw)
        assert out.dtype == half
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()  # inside autocast

    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref = prefix_attention(*(t.to(half) for t in ref_leaves), backend=backend, **kw)
    (ref.float() * torch.linspace(-1, 1, ref.shape[-1])).sum().backward()

    assert torch.equal(out, ref)
    for name, got, want, orig in zip("q k v pk pv".split(), leaves, ref_leaves, inputs):
        assert got.grad.dtype == orig.dtype, name
        assert torch.equal(got.grad, want.grad), name


def test_autocast_off_mixed_dtypes_still_refused():
    inputs, kw = _mixed_inputs(torch.bfloat16)
    with pytest.raises(TypeError, match="all inputs must share one dtype"):
        prefix_attention(*inputs, **kw)


def test_autocast_leaves_float64_alone():
    """Autocast never casts float64 (SDPA's output stays float64): a float64 model under a bf16
    autocast got a bfloat16 attention output and failed in its next projection."""
    (q, k, v, pk, pv), kw = make_inputs(B=2, Hq=2, Hkv=1, Sq=3, Skv=5, N=1, P=2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prefix_attention(q, k, v, pk, pv, **kw)
    assert out.dtype == torch.float64
    assert torch.equal(out, prefix_attention(q, k, v, pk, pv, **kw))


@pytest.mark.hf
def test_projected_prefix_cached_under_autocast_is_not_reused_without_it():
    """No-grad selections of trainable entries are cached; a projected entry computed under
    autocast (its MLP in bf16) was handed to later float32 calls, and the reverse; and a save
    inside autocast wrote the bf16-rounded prefix."""
    from prefix_attn.tiny import tiny_model
    from prefix_attn.tuning import prefix_tuning

    model = tiny_model("llama", seed=1)
    prefix_tuning(model, num_virtual_tokens=4, projection_hidden_size=16, name="a")
    bank = model.prefix_bank
    with torch.no_grad():
        fresh32 = bank.select("a", 2)._kv.clone()
        bank.clear_cache()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fresh16 = bank.select("a", 2)._kv.clone()
            saved_in_autocast = bank._materialize(bank._lookup(bank._state[1], "a"), cast=False)
        assert not torch.equal(fresh16, fresh32)  # else the test shows nothing
        assert torch.equal(bank.select("a", 2)._kv, fresh32)  # cached under autocast, asked without
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(bank.select("a", 2)._kv, fresh16)
        assert torch.equal(saved_in_autocast, fresh32[:, :, 0])


@pytest.mark.hf
def test_prefix_tuning_step_under_autocast_matches_float32():
    """A tiny Llama prefix-tuning step under bf16 autocast: runs on the fused path (mixed-dtype
    q/k/v reach it), and its loss and prefix gradient are float32's within bf16 error."""
    from prefix_attn.tiny import tiny_model
    from prefix_attn.tuning import prefix_tuning

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (2, 8), generator=g)
    results = []
    for autocast in (False, True):
        model = tiny_model("llama", seed=1)
        module = prefix_tuning(model, num_virtual_tokens=4, name="a")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids, prefixes=["a", None]).loss
        loss.backward()
        results.append((loss.detach().float(), module.embedding.weight.grad.clone()))
    (loss32, grad32), (loss16, grad16) = results
    assert grad16.dtype == torch.float32 and grad32.abs().sum() > 0
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=0)
    torch.testing.assert_close(grad16, grad32, rtol=0.1, atol=0.05 * grad32.abs().max().item())


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_autocast_inside_torch_compile_has_no_graph_break(backend):
    if backend not in prefix_attn.available_backends():
        pytest.skip(f"{backend} backend not available")
    inputs, kw = _mixed_inputs(torch.bfloat16)

    def fn(*a):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return prefix_attention(*a, backend=backend, **kw)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(*inputs), fn(*inputs))
