"""The reference against an independent naive formula (loops, explicit concatenation,
explicit mask, softmax in float64), and gradcheck of the reference and the torch backend."""
import math

import pytest
import torch

from prefix_attn import prefix_attention, prefix_attention_ref
from conftest import make_inputs


def naive(q, k, v, pk, pv, ids, lens, kpm, causal, scale, window, softcap):
    """One (row, head, query) at a time: concatenation of visible keys, then softmax."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = scale if scale is not None else D ** -0.5
    out = torch.zeros(B, Hq, Sq, D, dtype=torch.float64)
    lse = torch.full((B, Hq, Sq), -math.inf, dtype=torch.float64)
    for b in range(B):
        n = int(ids[b]) if ids is not None else 0
        L = int(lens[n]) if lens is not None else (pk.shape[-2] if pk is not None else 0)
        for h in range(Hq):
            hk = h // G
            for i in range(Sq):
                keys, vals = [], []
                for p in range(L):
                    keys.append(pk[n, hk, p]); vals.append(pv[n, hk, p])
                diag = Skv - Sq + i
                for j in range(Skv):
                    if causal and j > diag:
                        continue
                    if window is not None and diag - j >= window:
                        continue
                    if kpm is not None and not kpm[b, j]:
                        continue
                    keys.append(k[b, hk, j]); vals.append(v[b, hk, j])
                if not keys:
                    continue
                K = torch.stack(keys).double(); V = torch.stack(vals).double()
                s = (K @ q[b, h, i].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ V
    return out, lse


CASES = {
    # name: (make_inputs kwargs, attention kwargs)
    "P0": (dict(P=0), {}),
    "P1": (dict(P=1), {}),
    "P17": (dict(P=17, Sq=3, Skv=19), {}),
    "noprefix": (dict(P=None), {}),
    "Sq1": (dict(Sq=1, Skv=13), {}),
    "Sq_lt_Skv_odd": (dict(Sq=7, Skv=23, D=24), {}),
    "Sq_gt_Skv": (dict(Sq=9, Skv=5), {}),  # some queries see no own key at all
    "mha": (dict(Hq=3, Hkv=3), {}),
    "gqa3": (dict(Hq=6, Hkv=2), {}),
    "mqa": (dict(Hq=4, Hkv=1), {}),
    "bank": (dict(B=4, N=3, P=9, lens=[9, 0, 4], ids=[2, 0, 2, 1]), {}),
    "bank3d": (dict(bank_3d=True), {}),
    "left_pad": (dict(B=3, pad="left"), {}),
    "right_pad": (dict(B=3, pad="right"), {}),
    "window": (dict(Sq=6, Skv=11), dict(window=3)),
    "softcap": (dict(), dict(softcap=1.5)),
    "noncausal": (dict(pad="right"), dict(causal=False)),
    "window_noncausal": (dict(Sq=6, Skv=11, pad="left"), dict(window=2, causal=False)),
    "window_Sq_gt_Skv": (dict(Sq=9, Skv=4), dict(window=2)),
    "scale": (dict(), dict(scale=0.3)),
    "all": (dict(B=3, N=2, P=5, lens=[5, 2], ids=[1, 1, 0], pad="left", Hq=6, Hkv=2),
            dict(window=4, softcap=3.0)),
}


def _naive_call(args, kw):
    q, k, v, pk, pv = args
    if pk is not None and pk.dim() == 3:
        pk, pv = pk[None], pv[None]
    return naive(q, k, v, pk, pv, kw.get("prefix_ids"), kw.get("prefix_lens"),
                 kw.get("key_padding_mask"), kw.get("causal", True), kw.get("scale"),
                 kw.get("window"), kw.get("softcap"))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive(case):
    mk, akw = CASES[case]
    args, kw = make_inputs(dtype=torch.float64, **mk)
    kw.update(akw)
    out, lse = prefix_attention_ref(*args, **kw, return_lse=True)
    nout, nlse = _naive_call(args, kw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, nout, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, nlse, rtol=1e-10, atol=1e-10)


def test_reference_float32_close_to_naive():
    args, kw = make_inputs(B=3, N=2, P=6, lens=[6, 3], pad="right", dtype=torch.float32)
    out = prefix_attention_ref(*args, **kw)
    nout, _ = _naive_call(args, kw)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), nout, rtol=1e-5, atol=1e-5)


def test_empty_rows_give_zeros_and_neg_inf():
    # Sq > Skv with causal: the first queries see no own key; no prefix -> nothing visible.
    args, kw = make_inputs(Sq=6, Skv=3, P=None, dtype=torch.float64, requires_grad=True)
    out, lse = prefix_attention_ref(*args, **kw, return_lse=True)
    assert torch.all(out[:, :, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    out.sum().backward()
    for t in args[:3]:
        assert not torch.isnan(t.grad).any()


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("case", ["bank", "all", "noncausal"])
def test_gradcheck_all_five_inputs(impl, case):
    mk, akw = CASES[case]
    mk = dict(mk)
    mk.update(D=4, Skv=min(mk.get("Skv", 6), 6), Sq=min(mk.get("Sq", 3), 3))
    args, kw = make_inputs(dtype=torch.float64, requires_grad=True, **mk)
    kw.update(akw)
    fn = prefix_attention_ref if impl == "reference" else (
        lambda *a, **k: prefix_attention(*a, **k, backend="torch"))
    assert torch.autograd.gradcheck(lambda *t: fn(*t, **kw), args, eps=1e-6, atol=1e-6)


def test_bank_gradients_sum_over_rows_and_zero_elsewhere():
    args, kw = make_inputs(B=4, N=3, P=5, lens=[5, 0, 2], ids=[0, 2, 0, 0],
                           dtype=torch.float64, requires_grad=True)
    out = prefix_attention_ref(*args, **kw)
    out.square().sum().backward()
    pk, pv = args[3], args[4]
    # entry 1 is unused and has length 0; entry 2 is used up to position 2 only
    assert torch.all(pk.grad[1] == 0) and torch.all(pv.grad[1] == 0)
    assert torch.all(pk.grad[2, :, 2:] == 0) and torch.all(pv.grad[2, :, 2:] == 0)
    assert pk.grad[0].abs().sum() > 0 and pk.grad[2, :, :2].abs().sum() > 0
    # entry 0's gradient is the sum of the gradients of the three rows that use it
    q, k, v = (t.detach() for t in args[:3])
    total = torch.zeros_like(pk.grad[0])
    for b in (0, 2, 3):
        pk0 = pk.detach()[0].clone().requires_grad_(True)
        o = prefix_attention_ref(q[b:b + 1], k[b:b + 1], v[b:b + 1], pk0, pv.detach()[0])
        o.square().sum().backward()
        total += pk0.grad
    torch.testing.assert_close(pk.grad[0], total)


@pytest.mark.parametrize("impl", ["reference", "eager_fallback", "torch", "cpu", "triton"])
def test_garbage_beyond_the_lengths_and_in_unselected_entries_is_never_read(impl):
    """Entry 0 holds NaN beyond its length, entry 2 (selected by no row) inf everywhere: the
    output and the gradients equal those of clean entries (the reference and the HF eager
    fallback masked the scores only, and 0 * NaN reached the output)."""
    from prefix_attn.backends import available_backends

    if impl not in ("reference", "eager_fallback") and impl not in available_backends():
        pytest.skip(f"no {impl} backend")
    (q, k, v, pk, pv), kw = make_inputs(B=3, Hq=2, Hkv=1, Sq=5, Skv=5, D=8, N=3, P=6,
                                        lens=[3, 6, 2], ids=[0, 1, 0])
    dirty_k, dirty_v = pk.clone(), pv.clone()
    for t in (dirty_k, dirty_v):
        t[0, :, 3:] = float("nan")
        t[2] = float("inf")

    def run(bk, bv):
        args = [t.clone().requires_grad_(True) for t in (q, k, v, bk, bv)]
        if impl == "eager_fallback":
            from prefix_attn.hf.attention import eager_prefix_attention

            out = eager_prefix_attention(*args, **kw)[0].transpose(1, 2)
        else:
            fn = prefix_attention_ref if impl == "reference" else prefix_attention
            out = fn(*args, **kw, **({} if impl == "reference" else {"backend": impl}))
        out.backward(torch.ones_like(out))
        return out, [a.grad for a in args]

    want, want_grads = run(pk, pv)
    got, got_grads = run(dirty_k, dirty_v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert (got_grads[3][0, :, 3:] == 0).all() and (got_grads[3][2] == 0).all()
