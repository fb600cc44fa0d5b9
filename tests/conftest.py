"""Shared fixtures: random inputs for the contract, the flash-attention error rule, and the
Triton interpreter switch (set before anything imports triton)."""
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("PREFIX_ATTN_TRITON_ONE_CONFIG", "1")

import pytest  # noqa: E402

from prefix_attn.validation import normalize  # noqa: E402
from prefix_attn.reference import attention_from_args  # noqa: E402


def make_inputs(B=2, Hq=4, Hkv=2, Sq=5, Skv=9, D=16, N=1, P=7, *, lens=None, ids=None,
                pad=None, dtype=torch.float32, device="cpu", requires_grad=False, seed=0,
                bank_3d=False):
    """Random inputs of the contract.

    lens: list of N prefix lengths (None = all P); ids: list of B entry ids (None = zeros when
    N == 1, else random); pad: None | "left" | "right" -> key_padding_mask with a few padded
    own keys per row (row b gets b+1 pads, capped). Returns (args tuple, kwargs dict).
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    q = rnd(B, Hq, Sq, D)
    k = rnd(B, Hkv, Skv, D)
    v = rnd(B, Hkv, Skv, D)
    kw = {}
    if P is None:
        pk = pv = None
    else:
        pk = rnd(N, Hkv, P, D) if not bank_3d else rnd(Hkv, P, D)
        pv = rnd(N, Hkv, P, D) if not bank_3d else rnd(Hkv, P, D)
        if lens is not None:
            kw["prefix_lens"] = torch.tensor(lens, dtype=torch.long, device=device)
        if ids is not None:
            kw["prefix_ids"] = torch.tensor(ids, dtype=torch.long, device=device)
        elif N > 1:
            kw["prefix_ids"] = torch.randint(0, N, (B,), generator=g).to(device)
    if pad is not None:
        m = torch.ones(B, Skv, dtype=torch.bool)
        for b in range(B):
            n = min(b + 1, max(Skv - 1, 0))
            if pad == "left":
                m[b, :n] = False
            else:
                m[b, Skv - n:] = False
        kw["key_padding_mask"] = m.to(device)
    return (q, k, v, pk, pv), kw


def errors(x, y):
    return (x.double() - y.double()).abs().max().item() if x.numel() else 0.0


def assert_close_fa(out, truth, baseline, atol=1e-5, name="out"):
    """The flash-attention rule: |out - truth| <= 2 * |baseline - truth| + atol."""
    err, base = errors(out, truth), errors(baseline, truth)
    assert err <= 2 * base + atol, f"{name}: error {err:.3g} > 2 x baseline {base:.3g} + {atol:g}"


def ref_and_baseline(args, kw, upcast_grads=None):
    """Truth (reference in fp32/fp64 from the same inputs) and same-dtype baseline outputs."""
    from prefix_attn import prefix_attention_ref
    truth = prefix_attention_ref(*args, **kw)
    base = prefix_attention_ref(*args, **kw, upcast=False)
    return truth, base


@pytest.fixture
def inputs():
    return make_inputs
