"""The `triton` backend against the reference, forward and backward.

On this CPU machine the kernels run through the Triton interpreter (TRITON_INTERPRET=1, set
by conftest.py) on CPU tensors, fp32 and fp16 (the interpreter mishandles bf16); where CUDA
exists the same tests run the compiled kernels on the GPU, bf16 included. Error rule of
flash-attention: |triton - truth| <= 2 x |same-dtype PyTorch - truth| + atol, where the
truth is the reference computed in float64 and the baseline is the reference computed in
the input dtype (`upcast=False`).
"""
import os

import pytest
import torch

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import prefix_attn  # noqa: E402
from prefix_attn.kernels.common import key_tile_query_ranges  # noqa: E402
from prefix_attn import prefix_attention, prefix_attention_ref  # noqa: E402
from conftest import assert_close_fa, make_inputs  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                       reason="needs CUDA or TRITON_INTERPRET=1"),
]
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
ATOL = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}

# Small odd shapes; the interpreter runs 16x16 tiles, so 17/19/23/33 cross tile edges.
CASES = {
    "noprefix_P0": dict(P=None, Sq=5, Skv=9),
    "P0_bank": dict(P=0, Sq=5, Skv=9),
    "P1": dict(P=1, Sq=6, Skv=11),
    "P17_bank_lens": dict(B=3, N=3, P=17, lens=[17, 5, 0], ids=[2, 0, 1], Sq=5, Skv=19),
    "decode_Sq1_mqa": dict(Hq=3, Hkv=1, Sq=1, Skv=21, N=2, P=17, lens=[17, 9], ids=[1, 0]),
    "gqa3_Sq_lt_Skv_D40": dict(Hq=6, Hkv=2, Sq=7, Skv=23, D=40, P=17),
    "mha_D72": dict(Hq=2, Hkv=2, Sq=19, Skv=19, D=72, P=3),
    "leftpad": dict(B=3, Sq=4, Skv=17, P=5, pad="left"),
    "rightpad_bank": dict(B=3, N=2, P=9, lens=[9, 4], ids=[1, 0, 1], Sq=6, Skv=13, pad="right"),
    "window": dict(Sq=9, Skv=33, P=17, window=5),
    "window_noncausal": dict(Sq=9, Skv=20, P=5, window=4, causal=False),
    "softcap": dict(Sq=5, Skv=18, P=17, softcap=2.0),
    "noncausal_gqa": dict(Hq=4, Hkv=2, Sq=11, Skv=7, P=2, causal=False),
    "Sq_gt_Skv_empty_rows": dict(B=2, N=2, P=4, lens=[0, 4], ids=[0, 1], Sq=9, Skv=4),
    "mqa_D200": dict(Hq=2, Hkv=1, Sq=5, Skv=19, D=200, P=3),        # head dim padded to 256
    # a window wider than two tiles: the own dK/dV loop has masked, unmasked and masked parts
    "window_wide_gqa": dict(B=1, Hq=2, Hkv=1, Sq=40, Skv=45, P=3, window=30),
}
_OPTIONS = ("window", "softcap", "causal")


def _split(case):
    shape = {k: v for k, v in case.items() if k not in _OPTIONS}
    opts = {k: v for k, v in case.items() if k in _OPTIONS}
    return shape, opts


def _leaves(args, dtype=None):
    """Fresh leaf copies (optionally cast) of the differentiable inputs."""
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
            for t in args]


def _fwd_bwd(fn, args, kw, dout, **extra):
    """(out, lse, grads of every non-None input) of fn(*args, **kw) for the cotangent dout."""
    out, lse = fn(*args, **kw, return_lse=True, **extra)
    tensors = [t for t in args if t is not None]
    grads = torch.autograd.grad(out, tensors, dout.to(out.dtype))
    return out, lse, grads


@pytest.fixture
def per_row(monkeypatch):
    """Force the per-row forward kernel (the cascade path has its own tests below)."""
    monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", "0")


@pytest.fixture
def cascade(monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", "1")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, per_row):
    shape, opts = _split(CASES[case])
    args, kw = make_inputs(dtype=dtype, device=DEVICE, seed=len(case), **shape)
    kw.update(opts)
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(args[0].shape, generator=g).to(DEVICE)

    out, lse, grads = _fwd_bwd(prefix_attention, _leaves(args), kw, dout, backend="triton")
    truth, tlse, tgrads = _fwd_bwd(prefix_attention_ref, _leaves(args, torch.float64), kw, dout)
    base, _, bgrads = _fwd_bwd(prefix_attention_ref, _leaves(args), kw, dout, upcast=False)

    assert out.dtype == dtype and out.shape == args[0].shape and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert_close_fa(out, truth, base, atol=ATOL[dtype])
    finite = torch.isfinite(tlse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite].double(), tlse[finite], atol=1e-4, rtol=0)
    for name, a, t, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, tgrads, bgrads):
        assert a.dtype == dtype and a.shape == t.shape
        assert_close_fa(a, t, b, atol=ATOL[dtype] * 5, name=name)


def test_rows_without_visible_keys_give_zero_and_neg_inf():
    # Sq > Skv, causal, one row's prefix empty: its first queries see nothing at all.
    args, kw = make_inputs(B=2, N=2, P=4, lens=[0, 4], ids=[0, 1], Sq=6, Skv=2, device=DEVICE)
    out, lse = prefix_attention(*args, **kw, return_lse=True, backend="triton")
    assert torch.all(out[0, :, :4] == 0) and torch.all(lse[0, :, :4] == float("-inf"))
    assert torch.isfinite(lse[1]).all() and torch.isfinite(lse[0, :, 4:]).all()


def test_strided_hf_views_without_copies():
    # HF passes q/k/v as [B, S, H, D].transpose(1, 2); the bank may be a slice of a larger one.
    g = torch.Generator().manual_seed(3)
    B, Hq, Hkv, Sq, Skv, D, P = 2, 4, 2, 7, 12, 24, 9
    q = torch.randn(B, Sq, Hq, D, generator=g).transpose(1, 2).to(DEVICE)
    k = torch.randn(B, Skv, Hkv, D, generator=g).transpose(1, 2).to(DEVICE)
    v = torch.randn(B, Skv, Hkv, D, generator=g).transpose(1, 2).to(DEVICE)
    bank = torch.randn(3, 2, Hkv, P, D, generator=g).to(DEVICE)   # [N, k/v, Hkv, P, D]
    pk, pv = bank[:, 0], bank[:, 1]
    ids = torch.tensor([2, 0], device=DEVICE)
    assert not q.is_contiguous() and not pk.is_contiguous()
    out = prefix_attention(q, k, v, pk, pv, prefix_ids=ids, backend="triton")
    ref = prefix_attention_ref(q, k, v, pk, pv, prefix_ids=ids)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_non_unit_stride_along_the_head_dim_is_copied():
    # the kernels assume unit stride along D: a [.., D, S].transpose view is made contiguous
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 8, 3, generator=g).transpose(-1, -2).to(DEVICE)
    k, v = (torch.randn(1, 1, 5, 8, generator=g).to(DEVICE) for _ in range(2))
    assert q.stride(-1) == 3
    torch.testing.assert_close(prefix_attention(q, k, v, backend="triton"),
                               prefix_attention_ref(q.contiguous(), k, v), atol=2e-5, rtol=1e-5)


def test_bank_3d_single_entry():
    args, kw = make_inputs(bank_3d=True, P=5, device=DEVICE)
    torch.testing.assert_close(prefix_attention(*args, **kw, backend="triton"),
                               prefix_attention_ref(*args, **kw), atol=2e-5, rtol=1e-5)


def test_backward_is_deterministic_and_zero_where_unused():
    # Many rows share entry 0 (prefix-major reduction over 4 rows, and over 2 query chunks
    # summed afterwards: G * Sq = 18 > 16); entry 2 is unused.
    from prefix_attn.kernels.bwd import _prefix_chunks
    if INTERPRET:
        assert _prefix_chunks(torch.device(DEVICE), 18, 18, 6)[0] == 2
    args, kw = make_inputs(B=5, N=3, P=18, lens=[18, 5, 7], ids=[0, 1, 0, 0, 0], Sq=9, Skv=6,
                           pad="left", device=DEVICE, requires_grad=True)
    runs = []
    for _ in range(2):
        out = prefix_attention(*args, **kw, backend="triton")
        runs.append(torch.autograd.grad(out.square().sum(), args))
    for a, b in zip(*runs):
        assert torch.equal(a, b)                      # bitwise equal
    dpk, dpv = runs[0][3:]
    assert torch.all(dpk[2] == 0) and torch.all(dpv[2] == 0)            # unused entry
    assert torch.all(dpk[1, :, 5:] == 0) and torch.all(dpv[1, :, 5:] == 0)  # beyond its length
    assert dpk[0].abs().sum() > 0 and dpk[1, :, :5].abs().sum() > 0


@pytest.mark.parametrize("Sq,Skv", [(40, 40), (23, 11)])
def test_a_window_near_2_31_is_no_window(Sq, Skv):
    """A window just under 2**31 reached the kernels as int32 and wrapped in their position
    sums: dK/dV of the own keys were all zero, and with Sq > Skv the loop started before K/V
    (the interpreter crashed; a GPU reads out of bounds). A window of Skv or more hides
    nothing and reaches the kernels as no window."""
    args, kw = make_inputs(Sq=Sq, Skv=Skv, P=5, device=DEVICE, requires_grad=True)
    runs = []
    for window in (None, 2**31 - 1, 2**31 - 20):
        out = prefix_attention(*args, **kw, window=window, backend="triton")
        runs.append([out] + list(torch.autograd.grad(out.square().sum(), args)))
    for got in runs[1:]:
        for a, b in zip(got, runs[0]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert runs[0][2].abs().sum() > 0  # dk


def test_empty_batch_and_queries():
    for shape in (dict(B=0), dict(Sq=0)):
        args, kw = make_inputs(device=DEVICE, requires_grad=True, **shape)
        out = prefix_attention(*args, **kw, backend="triton")
        assert out.shape == args[0].shape
        grads = torch.autograd.grad(out.sum(), args, allow_unused=True)
        assert all(g is None or torch.all(g == 0) for g in grads)


def test_registered_backend_and_opcheck():
    assert "triton" in prefix_attn.available_backends()
    from prefix_attn.backends import get_backend
    b = get_backend("triton")
    assert DEVICE in b.devices
    if INTERPRET:
        # the slow interpreter is never the automatic choice on CPU
        assert b.priority < get_backend("torch").priority
    args, kw = make_inputs(B=2, N=2, P=5, lens=[5, 2], ids=[1, 0], Sq=3, Skv=7, pad="left",
                           device=DEVICE)
    q, k, v, pk, pv = args
    ops = torch.ops.prefix_attn
    fwd_args = (q, k, v, pk, pv, kw["prefix_ids"], kw["prefix_lens"], kw["key_padding_mask"],
                True, 0.25, 3, 0.0)
    torch.library.opcheck(ops.triton_fwd.default, fwd_args)
    out, lse = ops.triton_fwd(*fwd_args)
    for dlse in (None, torch.randn_like(lse)):  # the LSE's gradient, absent or given
        bwd_args = (torch.randn_like(out),) + fwd_args[:8] + (out, lse, dlse) + fwd_args[8:]
        torch.library.opcheck(ops.triton_bwd.default, bwd_args)


def test_torch_compile_has_no_graph_break():
    # fullgraph=True raises on any graph break. Inductor cannot compile interpreted kernels on
    # CPU, so there the graph is run by aot_eager (same tracing, op kept whole); on GPU the
    # kernels go through inductor (tests/test_triton_gpu.py covers it at real sizes).
    backend = "aot_eager" if INTERPRET else "inductor"
    args, kw = make_inputs(B=2, N=2, P=5, lens=[5, 3], ids=[1, 0], Sq=4, Skv=9, device=DEVICE,
                           requires_grad=True)

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, **kw, backend="triton")

    torch._dynamo.reset()
    out = torch.compile(f, backend=backend, fullgraph=True)(*args)
    ref = prefix_attention_ref(*args, **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), args)
    rgrads = torch.autograd.grad(ref.sum(), args)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_unsupported_calls_are_refused_clearly():
    args, kw = make_inputs(device=DEVICE, dtype=torch.float64)
    with pytest.raises(ValueError, match="triton"):
        prefix_attention(*args, **kw, backend="triton")
    if INTERPRET:
        args, kw = make_inputs(device=DEVICE, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="interpreter"):
            prefix_attention(*args, **kw, backend="triton")


@pytest.mark.parametrize("one", ["0", "1"])
def test_autotune_configs_are_pruned_and_one_config_switch(monkeypatch, one):
    # Builds the GPU config lists (interpreter off) and prunes them for several calls.
    from prefix_attn.kernels import autotune as at
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("PREFIX_ATTN_TRITON_ONE_CONFIG", one)
    assert at.bucket(1) == 1 and at.bucket(5) == 8 and at.bucket(64) == 64 and at.bucket(65) == 128
    for kind, configs in (("fwd", at.fwd_configs()), ("bwd", at.dkdv_configs()),
                          ("bwd", at.dq_configs())):
        prune = at.prune if kind == "fwd" else at.prune_bwd
        for block_d in (16, 64, 128, 256):
            for dtype in (torch.float16, torch.float32):
                for m_bucket in (1, 4096):
                    kept = prune(configs, {"BLOCK_D": block_d, "M_BUCKET": m_bucket,
                                           "Q": torch.empty(0, dtype=dtype)})
                    assert kept and all(c in configs for c in kept)
                    assert len(kept) == 1 if one == "1" else len(kept) <= len(configs)
                    for c in kept:
                        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
                        assert at.smem_estimate(bm, bn, block_d, c.num_stages, dtype.itemsize,
                                                kind) <= at.DEFAULT_SMEM
                        assert m_bucket > 64 or bm <= 64     # decode: no 128-row tiles
    if one == "0":   # the full search really is pruned for a wide fp32 head
        full = at.fwd_configs()
        assert len(at.prune(full, {"BLOCK_D": 256, "M_BUCKET": 4096,
                                   "Q": torch.empty(0, dtype=torch.float32)})) < len(full)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert len(at.fwd_configs()) == 1 and at.fwd_configs()[0].kwargs == {"BLOCK_M": 16, "BLOCK_N": 16}


@pytest.mark.parametrize("one", ["0", "1"])
def test_a_gpu_with_too_little_shared_memory_is_not_given_the_call(monkeypatch, one):
    """prune keeps the smallest config when none fits, and its launch failed (fp32 at head dim
    256 on an sm_86/89 GPU, 99 KiB per block): the backend says so instead, and another runs.
    The bound counts one pipeline stage, which every measured sm_90 compile met or exceeded."""
    from prefix_attn.kernels import autotune as at
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("PREFIX_ATTN_TRITON_ONE_CONFIG", one)
    kernels = (("forward", "fwd", at.fwd_configs()), ("dK/dV", "bwd", at.dkdv_configs()),
               ("dQ", "bwd", at.dq_configs()))
    sm86, a100, h100 = 101376, 166912, 232448
    why = at.smem_shortfall(kernels, 256, 4, sm86)
    assert why and "shared memory" in why and str(sm86) in why
    assert at.smem_shortfall(kernels, 256, 4, a100) is None   # compiled at 139,520 B there
    for block_d, elsize in ((128, 2), (256, 2), (128, 4), (64, 4)):
        assert at.smem_shortfall(kernels, block_d, elsize, sm86) is None
    assert at.smem_shortfall(kernels, 256, 4, h100) is None
    # the backend's own kernels, as the interpreter built them, fit the default budget
    from prefix_attn import triton_backend as tb
    assert {name for name, _, _ in tb._TUNED_KERNELS} >= {"forward", "dQ"}
    assert at.smem_shortfall(tb._TUNED_KERNELS, 256, 4, at.DEFAULT_SMEM) is None


def test_launches_run_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device: tensors on cuda:1 with cuda:0 current failed or
    raced. The guard makes their device current (and is entered by both ops)."""
    from prefix_attn import triton_backend as tb
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    guard = tb._guard_for(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    for dev in (torch.device("cuda", 0), torch.device("cuda"), torch.device("cpu")):
        assert not isinstance(tb._guard_for(dev), torch.cuda.device)
    seen = []
    real = tb._device_guard
    monkeypatch.setattr(tb, "_device_guard", lambda t: seen.append(t.device) or real(t))
    args, kw = make_inputs(device=DEVICE, B=2, Sq=3, Skv=5, P=2)
    leaves = _leaves(args)
    prefix_attention(*leaves, **kw, backend="triton").sum().backward()
    assert len(seen) == 2 and all(d == leaves[0].device for d in seen)


def _counted_fwd(monkeypatch):
    """The triton backend's fwd op wrapped to count its calls (the list it appends to)."""
    from prefix_attn.backends import get_backend
    b, calls = get_backend("triton"), []
    op = b.fwd
    monkeypatch.setattr(b, "fwd", lambda *a: calls.append(1) or op(*a))
    return calls


def test_a_call_without_autograd_runs_the_op_body_without_the_dispatcher(monkeypatch):
    """Serving (no_grad, inference_mode, or nothing requiring grad) skips the dispatcher and
    the custom-op wrapper (~15 us a call): same results; autograd still goes through the op."""
    args, kw = make_inputs(device=DEVICE, B=2, N=2, P=5, lens=[5, 2], ids=[1, 0], Sq=1, Skv=7,
                           pad="left")
    want = torch.ops.prefix_attn.triton_fwd(*args, kw["prefix_ids"], kw["prefix_lens"],
                                            kw["key_padding_mask"], True, 0.25, -1, 0.0)
    calls = _counted_fwd(monkeypatch)
    for ctx in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with ctx():
            out, lse = prefix_attention(*args, **kw, scale=0.25, return_lse=True,
                                        backend="triton")
        assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert calls == []
    prefix_attention(*_leaves(args), **kw, backend="triton").sum().backward()
    assert calls == [1]


class _Seen(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def test_modes_subclasses_and_the_profiler_still_see_the_op(monkeypatch):
    """The direct call is taken only where the dispatcher would add nothing: a dispatch mode,
    a function mode (`with torch.device`), a tensor subclass or the profiler get the op."""
    args, kw = make_inputs(device=DEVICE, B=1, Sq=1, Skv=5, P=3)
    calls = _counted_fwd(monkeypatch)

    def run(*a):
        with torch.no_grad():
            return prefix_attention(*a, **kw, backend="triton")
    seen = _Seen()
    with seen:
        run(*args)
    assert "prefix_attn.triton_fwd.default" in seen.ops and len(calls) == 1
    with torch.device(DEVICE):
        run(*args)
    assert len(calls) == 2
    run(args[0].as_subclass(_Sub), *args[1:])
    assert len(calls) == 3
    with torch.profiler.profile() as prof:
        run(*args)
    assert len(calls) == 4
    assert any(e.name == "prefix_attn::triton_fwd" for e in prof.events())
    run(*args)
    assert len(calls) == 4  # and none of it stuck


def test_the_direct_call_launches_with_wrap_triton_off(monkeypatch):
    """On a GPU the op is a triton_op, whose wrapper turns wrap_triton's tracing off (each
    launch went through a higher-order op otherwise): the direct call does the same."""
    from torch._library.triton import is_wrap_triton_enabled
    from prefix_attn import triton_backend as tb
    monkeypatch.setattr(tb, "_TRITON_OP", True)
    monkeypatch.setattr(tb, "_fwd_body", lambda *a: is_wrap_triton_enabled())
    assert is_wrap_triton_enabled() and tb.direct_fwd() is False and is_wrap_triton_enabled()


def test_host_power_of_two_matches_triton():
    from prefix_attn.kernels.autotune import next_pow2
    from prefix_attn.kernels.fwd import head_block
    assert [next_pow2(n) for n in range(1, 600)] == [triton.next_power_of_2(n) for n in range(1, 600)]
    assert [head_block(d) for d in (1, 16, 17, 40, 72, 128, 200, 256)] == [16, 16, 32, 64, 128, 128, 256, 256]


# -- cascade (decode) forward: prefixes read once per entry, own KV split, exact merge ----
CASCADE_CASES = {
    "Sq1_one_entry_all_rows": dict(B=4, N=1, P=17, Sq=1, Skv=21),
    "Sq1_shuffled_entries_lens": dict(B=7, N=4, P=19, lens=[19, 0, 6, 1],
                                      ids=[3, 0, 2, 0, 3, 1, 0], Sq=1, Skv=9),
    "Sq4_gqa_leftpad": dict(B=4, Hq=6, Hkv=2, N=1, P=9, Sq=4, Skv=37, pad="left", window=6),
    "Sq4_mqa_rightpad_D40_softcap": dict(B=5, Hq=4, Hkv=1, N=3, P=20, lens=[3, 20, 11],
                                         ids=[2, 1, 0, 1, 2], Sq=4, Skv=13, pad="right", D=40,
                                         softcap=3.0),
    "Sq4_noprefix_noncausal": dict(B=2, P=None, Sq=4, Skv=40, causal=False),
    "empty_rows": dict(B=2, N=2, P=4, lens=[0, 4], ids=[0, 1], Sq=6, Skv=3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASCADE_CASES))
def test_cascade_forward_matches_reference(case, dtype, cascade):
    shape, opts = _split(CASCADE_CASES[case])
    args, kw = make_inputs(dtype=dtype, device=DEVICE, seed=len(case), **shape)
    kw.update(opts)
    out, lse = prefix_attention(*args, **kw, return_lse=True, backend="triton")
    truth, tlse = prefix_attention_ref(*[None if t is None else t.double() for t in args], **kw,
                                       return_lse=True)
    base = prefix_attention_ref(*args, **kw, upcast=False)
    assert not torch.isnan(out).any()
    assert_close_fa(out, truth, base, atol=ATOL[dtype])
    finite = torch.isfinite(tlse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite].double(), tlse[finite], atol=1e-4, rtol=0)


def test_cascade_equals_per_row_and_backward_runs_through_it(monkeypatch):
    args, kw = make_inputs(B=5, N=2, P=18, lens=[18, 7], ids=[1, 0, 1, 1, 0], Sq=3, Skv=20,
                           pad="left", device=DEVICE, requires_grad=True)
    results = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", mode)
        out = prefix_attention(*args, **kw, backend="triton")
        results[mode] = (out, torch.autograd.grad(out.square().sum(), args))
    torch.testing.assert_close(results["1"][0], results["0"][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results["1"][1], results["0"][1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["0", "1"], ids=["per_row", "cascade"])
def test_rows_beyond_a_grid_axis_run_in_slices(monkeypatch, mode):
    """B * Hkv above CUDA's 65535 programs on grid axis 1 (e.g. 8192 rows of 8 kv heads, or a
    packed batch of that many sequences): the kernels with one program per (row, kv head) run
    in row slices that fit (the backend refused such calls before: a slower backend ran them).
    With the limit lowered to 4, 5 rows of 2 kv heads run in slices of 2, 2 and 1 rows and
    give bitwise what one launch gives, forward (with the LSE) and backward."""
    from prefix_attn.kernels import autotune, bwd, decode, fwd

    monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", mode)
    args, kw = make_inputs(B=5, Hq=4, Hkv=2, N=2, P=18, lens=[18, 7], ids=[1, 0, 1, 1, 0],
                           Sq=3, Skv=20, pad="left", device=DEVICE, requires_grad=True)

    def run():
        out, lse = prefix_attention(*args, **kw, return_lse=True, backend="triton")
        return [out, lse, *torch.autograd.grad(out.square().sum() + lse.sum(), args)]

    whole = run()
    sliced = []
    for mod in (fwd, bwd, decode):
        monkeypatch.setattr(mod, "row_chunks", lambda B, Hkv: sliced.append(
            autotune.row_chunks(B, Hkv)) or sliced[-1])
    monkeypatch.setattr(autotune, "MAX_GRID_YZ", 4)
    parts = run()
    assert sliced and all(c == [(slice(0, 2), 2), (slice(2, 4), 2), (slice(4, 5), 1)]
                          for c in sliced), sliced
    for a, b in zip(parts, whole):
        assert torch.equal(a, b)


def test_cascade_shape_rule():
    from prefix_attn.kernels.decode import use_cascade
    assert use_cascade(B=64, N=1, P=2048, Sq=1, Skv=64, Hkv=8)    # long shared prefix
    assert use_cascade(B=8, N=2, P=600, Sq=4, Skv=100, Hkv=8)     # two entries, both shared
    # measured on an H200: the per-row kernel was 1.6-1.75x faster here
    assert not use_cascade(B=64, N=1, P=128, Sq=1, Skv=4096, Hkv=8)
    assert use_cascade(B=2, N=2, P=0, Sq=4, Skv=4096, Hkv=8)      # underfilled grid: split-KV
    assert not use_cascade(B=2, N=2, P=0, Sq=4, Skv=100, Hkv=8)   # ... but short own KV
    assert not use_cascade(B=4, N=4, P=64, Sq=1, Skv=100)         # every row its own entry
    assert not use_cascade(B=8, N=1, P=64, Sq=17, Skv=4096)       # not decode
    assert not use_cascade(B=0, N=1, P=64, Sq=1, Skv=4096)
    # an entry is read once per 64 packed queries (G heads x Sq queries of each row), not once
    # per batch: 64 rows of G 4 read it 4 times at Sq 1, 64 times (no saving) at Sq 16
    assert use_cascade(B=64, N=1, P=2048, Sq=1, Skv=64, Hkv=8, G=4)
    assert not use_cascade(B=64, N=1, P=2048, Sq=16, Skv=64, Hkv=8, G=4)
    assert use_cascade(B=64, N=1, P=2048, Sq=4, Skv=64, Hkv=8, G=4)       # 16 reads of 64
    assert not use_cascade(B=16, N=1, P=100, Sq=8, Skv=64, Hkv=8, G=4)     # 8 reads of 16: 800 < 1024


def test_one_entry_tiles_match_the_sorted_grouping():
    """The cascade's index tensors for a one-entry bank (built from shapes, reused across calls)
    equal the general sort-based grouping, up to the general one's trailing idle tile."""
    from prefix_attn.kernels import decode
    for B, rows_per_row, block_m in [(1, 1, 16), (5, 4, 16), (64, 4, 64), (3, 40, 16)]:
        ids = torch.zeros(B, dtype=torch.long)
        fast = decode._entry_tiles(ids, 1, rows_per_row, block_m)
        again = decode._entry_tiles(ids, 1, rows_per_row, block_m)
        ref = decode._sorted_entry_tiles(ids, 1, rows_per_row, block_m)
        assert all(a is b for a, b in zip(fast[:4], again[:4]))      # built once per shape
        tiles = fast[4]
        assert ref[4] == tiles + 1 and int(ref[3][tiles]) == 1          # general: one idle tile
        for got, want in zip(fast[:3], ref[:3]):
            assert torch.equal(got, want)
        assert torch.equal(fast[3], ref[3][:tiles])



# Shapes (Sq, Skv, G, window or 0, causal) for the dK/dV tile ranges and the split-loop check.
RANGE_SHAPES = [(19, 19, 1, 0, True), (7, 23, 3, 0, True), (40, 45, 2, 30, True),
                (33, 33, 1, 17, True), (9, 4, 2, 0, True), (11, 7, 2, 0, False),
                (9, 20, 1, 4, False), (40, 40, 4, 40, False), (1, 21, 3, 0, True)]


@triton.jit
def _ranges_probe(OUT, Skv, Sq, off, window, G: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  MASK_ALL: tl.constexpr):
    pid = tl.program_id(0)
    a, b, c, d = key_tile_query_ranges(pid * BLOCK_N, Skv, Sq, off, window, G, BLOCK_M,
                                       BLOCK_N, CAUSAL, HAS_WINDOW, MASK_ALL)
    tl.store(OUT + pid * 4, a)
    tl.store(OUT + pid * 4 + 1, b)
    tl.store(OUT + pid * 4 + 2, c)
    tl.store(OUT + pid * 4 + 3, d)


def _tile_ranges(Sq, Skv, G, window, causal, block_m, block_n, mask_all=False):
    """(m_start, full_lo, full_hi, m_end) of kernels.common.key_tile_query_ranges for every
    own key tile, computed by a probe kernel (compiled on GPU, interpreted on CPU)."""
    tiles = -(-Skv // block_n)
    out = torch.full((tiles, 4), -7, dtype=torch.int32, device=DEVICE)
    _ranges_probe[(tiles,)](out, Skv, Sq, Skv - Sq, window, G, block_m, block_n, causal,
                            window > 0, mask_all)
    return out.cpu().tolist()


@pytest.mark.parametrize("shape", RANGE_SHAPES, ids=str)
def test_dkdv_tile_ranges_cover_exactly_the_visible_pairs(shape):
    """Brute force: packed query tiles outside [m_start, m_end) see no key of the key tile;
    tiles in [full_lo, full_hi) see every key of it (so they need no mask)."""
    Sq, Skv, G, window, causal = shape
    bm, bn = 16, 16
    off = Skv - Sq
    i = torch.arange(Sq)[:, None]
    j = torch.arange(Skv)[None, :]
    vis = torch.ones(Sq, Skv, dtype=torch.bool)
    if causal:
        vis &= j <= off + i
    if window:
        vis &= (off + i - j) < window
    vis = vis.repeat_interleave(G, 0)                      # packed rows m = i * G + g
    unmasked = 0
    for t, (m_start, full_lo, full_hi, m_end) in enumerate(
            _tile_ranges(Sq, Skv, G, window, causal, bm, bn)):
        keys = vis[:, t * bn:(t + 1) * bn]
        assert m_start % bm == 0 and m_start <= full_lo <= full_hi <= m_end <= G * Sq
        assert full_lo == full_hi == m_end or (full_lo % bm == 0 and full_lo < full_hi)
        assert not keys[:m_start].any() and not keys[m_end:].any()
        for start in range(full_lo, full_hi, bm):
            assert keys[start:start + bm].all()
            unmasked += 1
    # the shapes with a fully visible tile do exercise the unmasked loop
    assert unmasked > 0 or shape in [(9, 4, 2, 0, True), (9, 20, 1, 4, False), (1, 21, 3, 0, True)]
    for _, full_lo, full_hi, m_end in _tile_ranges(Sq, Skv, G, window, causal, bm, bn, True):
        assert full_lo == full_hi == m_end                  # key padding: every tile masked


@pytest.mark.parametrize("switch", ["SPLIT_MASKED_TILES", "HOIST_QUERY_OFFSETS"])
def test_backward_switches_give_the_same_gradients(monkeypatch, switch):
    """Each kernels.bwd switch (timed on GPU by bench_triton_gpu.ABLATIONS) changes how, not
    what: the split dK/dV loop equals masking every tile, hoisted query offsets equal the
    per-row index arithmetic (G 1, 2 and 4 divide the tile; G 3 takes the general path either
    way). Bit for bit, except the split on a GPU: there the compiler may contract an unmasked
    tile's scale-and-subtract into one FMA."""
    from prefix_attn.kernels import bwd
    dtype = torch.float32
    # G 1, 3, 2, 4; causal, causal + window, non-causal + window (each shape and setting
    # compiles its kernels on a GPU: kept few)
    for Sq, Skv, G, window, causal in [RANGE_SHAPES[i] for i in (0, 1, 2, 7)]:
        args, kw = make_inputs(B=2, Hq=2 * G, Hkv=2, Sq=Sq, Skv=Skv, P=5, dtype=dtype,
                               device=DEVICE, requires_grad=True, seed=Sq)
        kw.update(causal=causal, window=window or None)
        runs = []
        for setting in (True, False):
            monkeypatch.setattr(bwd, switch, setting)
            out = prefix_attention(*args, **kw, backend="triton")
            runs.append(torch.autograd.grad(out.float().square().sum(), args))
        for a, b in zip(*runs):
            if INTERPRET or switch == "HOIST_QUERY_OFFSETS":
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_cascade_switch_value_is_an_error(monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", "yes")
    args, kw = make_inputs(B=2, Sq=1, Skv=5, P=3, device=DEVICE)
    with pytest.raises(ValueError, match="PREFIX_ATTN_TRITON_CASCADE='yes'"):
        prefix_attention(*args, **kw, backend="triton")
