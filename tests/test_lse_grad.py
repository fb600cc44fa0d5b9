"""The LSE returned with ``return_lse=True`` is differentiable on every backend: its gradient
(d lse_i / d s_ij = p_ij) folds into the backward's Delta term. Checked against the
reference's autograd by the flash-attention rule, alone and together with the output's
gradient, on the contract shapes (prefix length 0 and 1, a bank of entries of different
lengths, GQA / MQA, padding, window, softcap, rows that see no key)."""
import pytest
import torch

from conftest import CONTRACT_SHAPES, GRAD_ATOL, assert_close_fa, make_inputs
from prefix_attn import prefix_attention, prefix_attention_ref
from prefix_attn.backends import available_backends

EXTRA = {"plain": {}, "window": dict(window=3), "softcap": dict(softcap=2.0),
         "noncausal": dict(causal=False)}


def _losses(out, lse, seed=1):
    """Two seeded weightings: of the output, and of the finite LSE entries (-inf rows give 0)."""
    g = torch.Generator().manual_seed(seed)
    wo = torch.randn(out.shape, generator=g).to(out)
    wl = torch.randn(lse.shape, generator=g).to(device=lse.device, dtype=lse.dtype)
    lse_term = (torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)) * wl).sum()
    return (out.float() * wo.float()).sum(), lse_term


def check_lse_grad(backend, shape_kw, extra_kw, dtype, device="cpu", use_out=True):
    args, kw = make_inputs(dtype=dtype, device=device, requires_grad=True, **shape_kw)
    kw.update(extra_kw)
    tensors = [t for t in args if t is not None]

    def grads(fn, **more):
        out, lse = fn(*args, **kw, return_lse=True, **more)
        lo, ll = _losses(out, lse)
        loss = lo + ll if use_out else ll
        return torch.autograd.grad(loss, tensors, allow_unused=True)

    ours = grads(prefix_attention, backend=backend)
    truth = grads(prefix_attention_ref)
    base = grads(prefix_attention_ref, upcast=False)
    for name, a, t, b in zip("q k v pk pv".split(), ours, truth, base):
        if t is None:  # v, pv with the output unused: no path from the loss
            assert a is None or not a.any(), f"d{name} should be zero"
            continue
        assert a is not None and a.shape == t.shape and a.dtype == t.dtype
        assert not a.isnan().any(), f"d{name} has NaN"
        scale = max(1.0, t.abs().max().item()) if t.numel() else 1.0
        assert_close_fa(a, t, b, atol=GRAD_ATOL[dtype] * scale, name=f"d{name}")


def _backends():
    names = [n for n in ("cpu", "torch") if n in available_backends()]
    if "triton" in available_backends():
        names.append(pytest.param("triton", marks=pytest.mark.interpreter))
    return names


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("extra", list(EXTRA))
@pytest.mark.parametrize("shape", list(CONTRACT_SHAPES))
def test_lse_and_out_gradients_match_reference(backend, shape, extra):
    if backend not in available_backends():
        pytest.fail(f"backend {backend} is not built")
    check_lse_grad(backend, CONTRACT_SHAPES[shape], EXTRA[extra], torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_lse_gradient_half_precision(backend, dtype):
    check_lse_grad(backend, CONTRACT_SHAPES["bank_rightpad"], {}, dtype)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", ["P1_Sq1", "bank_rightpad", "mqa_leftpad"])
def test_lse_alone_drives_the_gradients(backend, shape):
    """The output unused: dout arrives as None and only the LSE's gradient flows."""
    check_lse_grad(backend, CONTRACT_SHAPES[shape], {}, torch.float32, use_out=False)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,extra", [("P17_gqa3", "softcap"), ("bank_rightpad", "window"),
                                         ("P0", "noncausal")])
def test_lse_gradient_triton(shape, extra, dtype):
    check_lse_grad("triton", CONTRACT_SHAPES[shape], EXTRA[extra], dtype)


@pytest.mark.parametrize("backend", _backends())
def test_rows_without_visible_keys_give_finite_gradients(backend):
    """A row whose keys are all padded and which has no prefix: lse -inf, gradient zero."""
    args, kw = make_inputs(B=2, Hq=2, Hkv=1, Sq=3, Skv=4, N=2, P=3, lens=[0, 3], ids=[0, 1],
                           requires_grad=True)
    kw["key_padding_mask"] = torch.tensor([[False] * 4, [True] * 4])
    out, lse = prefix_attention(*args, **kw, backend=backend, return_lse=True)
    assert torch.isinf(lse[0]).all() and torch.isfinite(lse[1]).all()
    loss = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum() + out.sum()
    gq, gk = torch.autograd.grad(loss, args[:2])
    assert torch.isfinite(gq).all() and (gq[0] == 0).all() and (gq[1] != 0).any()
    assert (gk[0] == 0).all()


@pytest.mark.parametrize("backend", _backends())
def test_a_non_finite_lse_gradient_where_no_key_is_seen_is_dropped(backend):
    """A left-padded query sees no key (lse -inf); the gradient reaching its lse may be NaN
    (torch.logaddexp's backward of two -inf, merging partial attentions by LSE). The torch and
    triton backends gave NaN in its dq and in the dk of every real key of the row."""
    args, kw = make_inputs(B=2, Hq=2, Hkv=1, Sq=3, Skv=3, N=1, P=2, lens=[0], ids=[0, 0],
                           requires_grad=True)
    kw["key_padding_mask"] = torch.tensor([[False, True, True], [True, True, True]])
    other = torch.full((2, 2, 3), float("-inf"))

    def grads(fn, **more):
        out, lse = fn(*args, **kw, return_lse=True, **more)
        merged = torch.logaddexp(lse, other)  # NaN gradient where both are -inf
        loss = out.sum() + torch.where(torch.isfinite(merged), merged, 0).sum()
        return torch.autograd.grad(loss, args[:3])

    for name, a, t in zip("qkv", grads(prefix_attention, backend=backend),
                          grads(prefix_attention_ref)):
        assert not a.isnan().any(), f"d{name} has NaN"
        torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-4)


def test_gradcheck_float64_with_lse():
    """torch backend, float64: the analytic gradient of (out, lse) against finite differences."""
    args, kw = make_inputs(B=2, Hq=2, Hkv=1, Sq=3, Skv=4, D=4, N=2, P=2, lens=[2, 1], ids=[1, 0],
                           dtype=torch.float64, requires_grad=True, pad="left")

    def f(*t):
        return prefix_attention(*t, **kw, backend="torch", return_lse=True, softcap=3.0)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_lse_gradient_is_deterministic():
    args, kw = make_inputs(B=4, Sq=9, Skv=11, N=2, P=5, lens=[5, 2], ids=[0, 1, 1, 0],
                           requires_grad=True)
    runs = []
    for _ in range(2):
        out, lse = prefix_attention(*args, **kw, backend="cpu", return_lse=True)
        runs.append(torch.autograd.grad(out.sum() + lse.sum(), args))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
