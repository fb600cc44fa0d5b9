"""Numerical and robustness edges found by the numerics audit (/tmp/audit_num/REPORT.md):

* the Triton softcap tanh was accurate only in absolute terms (1 - 2/(exp(2x)+1) cancels for
  small |x|), so the scores softcap * tanh(s / softcap) were off by ~softcap * 6e-8;
* the cached range check of prefix_ids / prefix_lens could be bypassed by writes that do not
  bump the tensor's version counter (.numpy(), .data, a from_numpy buffer), and the torch
  backend then picked entry -1 by Python indexing (triton read out of bounds);
* `_bwd_delta` put B * Hq on grid axis 1, which CUDA caps at 65535 (B 4096, Hq 32, Hkv 8).

Triton kernels run here under the interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU
tensors; the grid test records the launches without running any kernel.
"""
import os

import numpy as np
import pytest
import torch

from conftest import assert_close_fa, make_inputs

from prefix_attn import prefix_attention, prefix_attention_ref

try:
    import triton
    import triton.language as tl
    from prefix_attn.kernels.common import tanh as _tanh
except ImportError:  # the torch-backend tests still run
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    triton is None or (not INTERPRET and not torch.cuda.is_available()),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1")
needs_interpreter = pytest.mark.skipif(
    triton is None or not INTERPRET, reason="CPU tensors on the triton backend: TRITON_INTERPRET=1")
needs_triton_import = pytest.mark.skipif(triton is None, reason="needs triton")
DEVICE = "cpu" if INTERPRET or not torch.cuda.is_available() else "cuda"

if triton is not None:
    @triton.jit
    def _tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(Y + offs, _tanh(tl.load(X + offs, mask=m, other=0.0)), mask=m)


# -- 1. softcap tanh: relative accuracy -----------------------------------------------------

@pytest.mark.interpreter
@needs_triton
@pytest.mark.filterwarnings("error::RuntimeWarning")   # exp(2|x|) overflowed to inf before
def test_triton_tanh_is_accurate_in_relative_terms():
    """kernels.common.tanh against float64 tanh: relative error ~1e-7 everywhere, including
    tiny |x| (the exp form alone gave 1.00017e-4 for tanh(1e-4)), both signs, +-inf, and
    around the switch to the series, with no overflow on the way. (On a GPU tl.exp and the
    division are approximate instructions: a looser bound there.)"""
    mag = torch.cat([torch.logspace(-30, 1.5, 4001), torch.linspace(0.0, 3.0, 6001),
                     torch.linspace(0.3, 0.7, 4001),   # around the switch to the series
                     torch.tensor([1e30, float("inf")])]).float()
    x = torch.cat([mag, -mag]).to(DEVICE)
    y = torch.empty_like(x)
    block = 1 << 14
    _tanh_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    truth = torch.tanh(x.double())
    nz = truth != 0
    assert torch.equal(y[~nz], x[~nz])            # +-0 stay +-0
    rel = ((y.double() - truth).abs() / truth.abs())[nz]
    tol = 3e-7 if INTERPRET else 1e-6
    assert rel.max().item() < tol, f"max relative error {rel.max().item():.3g} at x = " \
                                    f"{x[nz][rel.argmax()].item()!r}"


@pytest.mark.interpreter
@needs_triton
@pytest.mark.parametrize("path", ["per_row", "cascade"])
@pytest.mark.parametrize("softcap", [1e3, 1e4])
def test_triton_large_softcap_fp32(softcap, path, monkeypatch):
    """fp32, a large softcap (the scores are ~1e1..1e2, so s / softcap is small): forward, LSE
    and the five gradients against the float64 reference by the flash-attention rule (the old
    tanh put out 4e-4 (1e3) and 2.6e-3 (1e4) off, against a baseline of ~5e-6)."""
    monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", "1" if path == "cascade" else "0")
    # Sq = 18: two 16-row m tiles per (row, head) in _bwd_delta and _cascade_merge
    args, kw = make_inputs(B=2, Hq=2, Hkv=1, Sq=18, Skv=21, D=16, N=2, P=7, lens=[7, 3],
                           ids=[1, 0], device=DEVICE)
    args = [t * 3 for t in args]          # q, k, v ~ N(0, 9): logits up to ~1e2
    kw["softcap"] = softcap
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(args[0].shape, generator=g).to(DEVICE)

    def run(fn, dtype, **extra):
        leaves = [t.detach().to(dtype).requires_grad_() for t in args]
        out, lse = fn(*leaves, **kw, return_lse=True, **extra)
        return out, lse, torch.autograd.grad(out, leaves, dout.to(out.dtype))

    out, lse, grads = run(prefix_attention, torch.float32, backend="triton")
    truth, tlse, tgrads = run(prefix_attention_ref, torch.float64)
    base, _, bgrads = run(prefix_attention_ref, torch.float32, upcast=False)
    assert_close_fa(out, truth, base, atol=5e-6)
    torch.testing.assert_close(lse.double(), tlse, atol=2e-5, rtol=0)
    if path == "cascade":
        return                            # the backward is the same kernels for both paths
    for name, a, t, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, tgrads, bgrads):
        assert_close_fa(a, t, b, atol=1e-5 * max(1.0, t.abs().max().item()), name=name)


# -- 2. stale cached range of prefix_ids / prefix_lens -------------------------------------

def _bank_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 2, 16, generator=g)
    k, v = torch.randn(2, 1, 3, 16, generator=g), torch.randn(2, 1, 3, 16, generator=g)
    pk, pv = torch.randn(2, 1, 4, 16, generator=g), torch.randn(2, 1, 4, 16, generator=g)
    return q, k, v, pk, pv


_BACKENDS = ["torch", pytest.param("triton", marks=[pytest.mark.interpreter, needs_interpreter])]


@pytest.mark.parametrize("backend", _BACKENDS)
def test_ids_rewritten_without_version_bump_are_rechecked(backend):
    """The audit's repro: a first call caches nothing stale; ids.numpy()[1] = -1 changes the
    values without bumping ids._version; the next call must refuse, not use entry -1."""
    q, k, v, pk, pv = _bank_inputs()
    ids = torch.tensor([0, 1])
    prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend=backend)
    version = ids._version
    ids.numpy()[1] = -1
    assert ids._version == version        # the write the cache could not see
    with pytest.raises(ValueError, match="prefix_ids"):
        prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend=backend)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_lens_in_refilled_from_numpy_buffer_are_rechecked(backend):
    """A serving loop's pinned host buffer (torch.from_numpy) refilled in numpy."""
    q, k, v, pk, pv = _bank_inputs()
    buf = np.array([4, 2], dtype=np.int64)
    lens = torch.from_numpy(buf)
    ids = torch.tensor([1, 0])
    prefix_attention(q, k, v, pk, pv, prefix_ids=ids, prefix_lens=lens, backend=backend)
    buf[:] = [5, 2]                                                   # > P = 4
    with pytest.raises(ValueError, match="prefix_lens"):
        prefix_attention(q, k, v, pk, pv, prefix_ids=ids, prefix_lens=lens, backend=backend)


def test_ids_written_through_data_are_rechecked():
    q, k, v, pk, pv = _bank_inputs()
    ids = torch.tensor([0, 1])
    prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend="torch")
    ids.data[0] = 2                                                   # N = 2
    with pytest.raises(ValueError, match="prefix_ids"):
        prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend="torch")


@pytest.mark.parametrize("ids,lens,name", [([0, -1], [4, 4], "prefix_ids"),
                                           ([2, 0], [4, 4], "prefix_ids"),
                                           ([0, 1], [4, 5], "prefix_lens"),
                                           ([0, 1], [-1, 4], "prefix_lens")])
def test_torch_backend_refuses_out_of_range_entries_itself(ids, lens, name):
    """The torch ops re-check the values they read anyway (validation bypassed here): no
    entry -1 by Python indexing, no IndexError, no length clipped by slicing."""
    q, k, v, pk, pv = _bank_inputs()
    ids, lens = torch.tensor(ids), torch.tensor(lens)
    common = (ids, lens, None, True, 16 ** -0.5, -1, 0.0)
    with pytest.raises(ValueError, match=name):
        torch.ops.prefix_attn.torch_fwd(q, k, v, pk, pv, *common)
    out, lse = torch.ops.prefix_attn.torch_fwd(q, k, v, pk, pv, torch.tensor([0, 1]),
                                               torch.tensor([4, 4]), None, True, 16 ** -0.5,
                                               -1, 0.0)
    with pytest.raises(ValueError, match=name):
        torch.ops.prefix_attn.torch_bwd(torch.ones_like(out), q, k, v, pk, pv, *common[:3],
                                        out, lse, None, *common[3:])


# -- 3. grid limits of every Triton launch -------------------------------------------------

_AXIS0_MAX, _AXIS12_MAX = 2 ** 31 - 1, 65535


def _record_grids(monkeypatch):
    """Replace wrap_triton in the launcher modules by a recorder: each launch appends
    (kernel name, grid) and runs nothing. Autotuned grids are evaluated with 16-wide blocks
    (the smallest configs: the largest axis 0; axes 1 and 2 do not depend on the blocks)."""
    from prefix_attn.kernels import bwd, decode, fwd

    launches = []

    class _Launcher:
        def __init__(self, kernel):
            self.name = getattr(kernel, "__name__", None) or getattr(kernel.fn, "__name__", "?")

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                g = grid(dict(kwargs, BLOCK_M=16, BLOCK_N=16)) if callable(grid) else grid
                launches.append((self.name, tuple(int(x) for x in g)))
            return launch

    for mod in (fwd, bwd, decode):
        monkeypatch.setattr(mod, "wrap_triton", _Launcher)
    return launches


def _launch_all(B, Hq, Hkv, Sq, Skv, N, P, D):
    from prefix_attn.kernels import bwd, decode, fwd

    q = torch.zeros(B, Hq, Sq, D)
    k = v = torch.zeros(B, Hkv, Skv, D)
    pk = pv = torch.zeros(N, Hkv, P, D)
    ids = torch.zeros(B, dtype=torch.int64)
    lens = torch.full((N,), P, dtype=torch.int64)
    out = torch.zeros_like(q)
    lse = torch.zeros(B, Hq, Sq)
    fwd.attn_fwd(q, k, v, pk, pv, ids, lens, None, out, lse, True, 0.25, -1, 0.0)
    decode.cascade_fwd(q, k, v, pk, pv, ids, lens, None, out, lse, True, 0.25, -1, 0.0)
    grads = [torch.empty_like(t) for t in (q, k, v, pk, pv)]
    bwd.attn_bwd(out, q, k, v, pk, pv, ids, lens, None, out, lse, lse, *grads, True, 0.25, -1,
                 0.0)


@pytest.mark.parametrize("dims", [
    # GQA with B * Hq = 131072 > 65535 while B * Hkv = 32768 passes the backend's guard
    dict(B=4096, Hq=32, Hkv=8, Sq=1, Skv=1, N=1, P=1, D=8),
    # cdiv(Sq, 16) = 65537 m tiles (a forced cascade, a long backward)
    dict(B=1, Hq=1, Hkv=1, Sq=16 * 65536 + 1, Skv=1, N=1, P=1, D=1),
    # B * Hkv = 320000 programs per (row, kv head): launched in row slices
    dict(B=40000, Hq=16, Hkv=8, Sq=1, Skv=2, N=1, P=1, D=8),
], ids=["gqa_B4096_Hq32", "Sq_1M", "B40000_Hkv8"])
@needs_triton_import
def test_every_launch_fits_cuda_grid_limits(dims, monkeypatch):
    """CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2**31 - 1). The grids of every kernel
    launched by the forward (per-row and cascade) and the backward, computed on CPU without a
    GPU: the backend's guard (N * Hkv <= 65535) must be the only limit needed; more rows than
    one launch's grid holds run in slices."""
    from prefix_attn.kernels.autotune import MAX_GRID_YZ

    assert dims["N"] * dims["Hkv"] <= MAX_GRID_YZ
    launches = _record_grids(monkeypatch)
    _launch_all(**dims)
    names = {n for n, _ in launches}
    assert {"_attn_fwd", "_cascade_prefix", "_cascade_own", "_cascade_merge", "_bwd_delta",
            "_bwd_dkdv_own", "_bwd_dkdv_prefix", "_bwd_dq"} <= names, names
    for name, grid in launches:
        assert 1 <= len(grid) <= 3 and min(grid) >= 0, (name, grid)
        assert grid[0] <= _AXIS0_MAX, (name, grid)
        assert all(g <= _AXIS12_MAX for g in grid[1:]), (name, grid)
    for name in ("_attn_fwd", "_cascade_own", "_bwd_dkdv_own", "_bwd_dq"):  # every (row, kv head)
        assert sum(g[1] for n, g in launches if n == name) == dims["B"] * dims["Hkv"], name


# -- 4. gaps found by a mutation audit: large prefix scores, strided last dims ----------------

def _backend_params():
    """(backend, triton cascade mode) pairs: the cpu and torch backends, and the triton
    kernels' per-row and cascade paths (interpreter)."""
    from prefix_attn.backends import available_backends
    names = [(n, None) for n in ("cpu", "torch") if n in available_backends()]
    marks = [pytest.mark.interpreter, needs_interpreter]
    names += [pytest.param("triton", mode, marks=marks) for mode in ("0", "1")]
    return names


@pytest.mark.parametrize("backend,cascade", _backend_params())
@pytest.mark.parametrize("Sq", [1, 5])
def test_scores_dominated_by_the_prefix_stay_finite(backend, cascade, Sq, monkeypatch):
    """Scores of a few hundred (q and the prefix keys scaled by 20): exp overflows float32 unless
    the running max covers the prefix tiles and the cascade merge shifts by the larger of its
    two maxima; out and LSE against the float64 reference."""
    if cascade is not None:
        monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", cascade)
    args, kw = make_inputs(B=3, Hq=4, Hkv=2, Sq=Sq, Skv=11, N=2, P=9, lens=[9, 3], ids=[0, 1, 0],
                           pad="left", seed=4)
    q, k, v, pk, pv = args
    args = (q * 20, k, v, pk * 20, pv)
    out, lse = prefix_attention(*args, **kw, return_lse=True, backend=backend)
    truth, tlse = prefix_attention_ref(*[t.double() for t in args], **kw, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert tlse.abs().max() > 200  # the case really is one of large scores
    torch.testing.assert_close(out.double(), truth, atol=1e-4, rtol=0)
    torch.testing.assert_close(lse.double(), tlse, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("backend,cascade", _backend_params())
def test_inputs_with_a_strided_last_dim(backend, cascade, monkeypatch):
    """q, k, v and the bank taken as every other element of a wider tensor (stride(-1) == 2):
    the kernels assume a contiguous last dim, so the host must copy these."""
    if cascade is not None:
        monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", cascade)
    args, kw = make_inputs(B=2, Hq=4, Hkv=2, Sq=3, Skv=7, D=32, N=2, P=5, lens=[5, 2],
                           ids=[1, 0], seed=6)
    strided = [t[..., ::2] for t in args]
    assert all(t.stride(-1) == 2 for t in strided)
    leaves = [t.detach().requires_grad_() for t in strided]
    dense = [t.detach().contiguous().requires_grad_() for t in strided]
    out = prefix_attention(*leaves, **kw, backend=backend)
    truth = prefix_attention_ref(*dense, **kw)
    torch.testing.assert_close(out, truth, atol=2e-5, rtol=0)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    for a, t in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(truth, dense, g)):
        torch.testing.assert_close(a, t, atol=1e-4, rtol=0)


@pytest.mark.parametrize("with_scope", [False, True])
def test_interpreter_shim_takes_both_hook_signatures(monkeypatch, with_scope):
    """Triton <= 3.5 calls the interpreter's tensor-patching hook with the tensor class alone,
    3.6+ with a scope too: the NumPy >= 2.4 shim failed every interpreted launch on the older
    form ("missing 1 required positional argument: 'scope'")."""
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    from prefix_attn.kernels import interpreter_compat
    calls = []

    if with_scope:
        def hook(tensor, scope):
            calls.append(scope)
    else:
        def hook(tensor):
            calls.append(None)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", hook)
    interpreter_compat.apply()

    class Scope:
        def set_attr(self, obj, name, value):
            setattr(obj, name, value)

    class Handle:
        data = np.array([7])

    class FakeTensor:
        handle = Handle()

    interpreter._patch_lang_tensor(FakeTensor, *([Scope()] if with_scope else []))
    assert len(calls) == 1 and int(FakeTensor().__index__()) == 7
