"""The `cpu` backend (C++ extension prefix_attn._C) against the reference: forward and
backward, fp32/fp16/bf16, odd shapes that cross the kernel's tiles (32 queries x 64 keys),
GQA/MQA, banks with entries of different lengths, padding, window, softcap, non-causal;
determinism, opcheck, input checks in C++, and the default choice on CPU."""
import os
import subprocess
import sys

import pytest
import torch

from prefix_attn import prefix_attention, prefix_attention_ref
from prefix_attn.backends import available_backends
from conftest import (CONTRACT_EXTRA, CONTRACT_SHAPES, assert_close_fa, check_contract,
                      check_deterministic_backward, check_unused_entries_zero_grad, make_inputs)

pytestmark = pytest.mark.skipif("cpu" not in available_backends(),
                                reason="extension prefix_attn._C not built")

# The shared contract cases, plus ones that cross the kernel's tiles (32 queries x 64 keys).
SHAPES = dict(
    CONTRACT_SHAPES,
    # more queries and keys than one tile, prefix longer than one key tile
    tiles_bank=dict(B=3, Hq=6, Hkv=2, Sq=37, Skv=70, D=8, N=3, P=70, lens=[70, 0, 5], ids=[2, 0, 1]),
    # more queries than keys: the first queries see no own key (and no prefix: zeros)
    Sq_gt_Skv_P0=dict(Sq=6, Skv=3, P=0),
    head_dim_256=dict(B=1, Hq=2, Hkv=1, Sq=5, Skv=9, D=256, P=3),
)
EXTRA = CONTRACT_EXTRA


def grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", list(EXTRA))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cpu_backend_matches_reference(shape, extra, dtype):
    check_contract("cpu", SHAPES[shape], EXTRA[extra], dtype)


def test_fp32_is_tight():
    """fp32 against the reference with a fixed tolerance (not only relative to a baseline)."""
    args, kw = make_inputs(B=2, Hq=8, Hkv=2, Sq=65, Skv=129, D=64, N=2, P=40, lens=[40, 33],
                           ids=[1, 0], pad="left", requires_grad=True)
    tensors = list(args)
    out = prefix_attention(*args, **kw, backend="cpu")
    truth = prefix_attention_ref(*args, **kw)
    torch.testing.assert_close(out, truth, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(out)
    for a, t in zip(grads(out, tensors, g), grads(truth, tensors, g)):
        torch.testing.assert_close(a, t, atol=1e-5, rtol=1e-4)


def test_backward_is_bitwise_deterministic():
    check_deterministic_backward("cpu")


def test_unused_entries_and_positions_beyond_len_get_zero_grad():
    check_unused_entries_zero_grad("cpu")


def test_strided_inputs():
    """q/k/v as views of a packed [B, S, H, D] projection (the layout HF transposes)."""
    g = torch.Generator().manual_seed(1)
    B, S, Hq, Hkv, D = 2, 11, 4, 2, 16
    qkv = torch.randn(B, S, Hq + 2 * Hkv, D, generator=g)
    q = qkv[:, :, :Hq].transpose(1, 2)
    k = qkv[:, :, Hq:Hq + Hkv].transpose(1, 2)
    v = qkv[:, :, Hq + Hkv:].transpose(1, 2)
    pk, pv = torch.randn(2, 1, Hkv, 5, D, generator=g).unbind(0)
    out = prefix_attention(q, k, v, pk, pv, backend="cpu")
    truth = prefix_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), pk, pv)
    torch.testing.assert_close(out, truth, atol=2e-6, rtol=1e-5)


def test_cpu_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("PREFIX_ATTN_BACKEND", raising=False)
    from prefix_attn.backends import choose_backend
    from prefix_attn.validation import normalize
    args, kw = make_inputs()
    assert choose_backend(normalize(*args, **kw)).name == "cpu"
    assert available_backends().index("cpu") < available_backends().index("torch")


def _op_args(B=2, Hq=4, Hkv=2, Sq=5, Skv=9, D=16, N=2, P=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
    return [r(B, Hq, Sq, D), r(B, Hkv, Skv, D), r(B, Hkv, Skv, D), r(N, Hkv, P, D),
            r(N, Hkv, P, D), torch.tensor([1, 0]), torch.tensor([P, 3]),
            torch.rand(B, Skv, generator=g) > 0.2, True, D ** -0.5, -1, 0.0]


def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        a = _op_args(dtype=dtype)
        for t in a[:5]:
            t.requires_grad_(True)
        torch.library.opcheck(torch.ops.prefix_attn.fwd.default, a)
        out, lse = torch.ops.prefix_attn.fwd.default(*a)
        dout = torch.randn_like(out)
        for dlse in (None, torch.randn_like(lse)):  # the LSE's gradient, absent or given
            b = [dout] + a[:8] + [out.detach(), lse, dlse] + a[8:]
            torch.library.opcheck(torch.ops.prefix_attn.bwd.default,
                                  [t.detach() if isinstance(t, torch.Tensor) else t for t in b])


@pytest.mark.parametrize("what", ["ids_high", "ids_negative", "lens_high", "kv_heads",
                                  "dtype_mix", "mask_shape", "window_zero", "window_huge",
                                  "ids_dtype", "no_query_heads", "softcap_rounds_to_zero",
                                  "softcap_ratio_overflows", "scale_beyond_float32"])
def test_cpp_checks_reject_bad_input(what):
    """The op is called directly (bypassing Python validation): C++ must reject, not crash.
    A window past 2**62 overflowed the kernels' int64 position sums (own-key dK/dV zeroed)."""
    a = _op_args()
    if what == "ids_high":
        a[5] = torch.tensor([2, 0])
    elif what == "ids_negative":
        a[5] = torch.tensor([-1, 0])
    elif what == "lens_high":
        a[6] = torch.tensor([8, 0])
    elif what == "kv_heads":
        a[1] = a[1][:, :1]
    elif what == "dtype_mix":
        a[2] = a[2].double()
    elif what == "mask_shape":
        a[7] = a[7][:, :3]
    elif what == "window_zero":
        a[10] = 0
    elif what == "window_huge":
        a[10] = 2**63 - 1
    elif what == "ids_dtype":
        a[5] = a[5].int()
    # from a sanitizer audit: Hq 0 gave an invalid CUDA launch; the kernels take scale and
    # softcap as float32, where 1e-46 rounded to 0 (read as no softcap)
    elif what == "no_query_heads":
        a[0] = a[0][:, :0]
    elif what == "softcap_rounds_to_zero":
        a[11] = 1e-46
    elif what == "softcap_ratio_overflows":
        a[9], a[11] = 1e30, 1e-20
    elif what == "scale_beyond_float32":
        a[9] = 1e39
    with pytest.raises(RuntimeError, match="prefix_attn"):
        torch.ops.prefix_attn.fwd.default(*a)


def test_torch_compile_traces_through_the_op():
    args, kw = make_inputs(B=2, N=2, P=5, ids=[1, 0])
    f = torch.compile(lambda *a: prefix_attention(*a, **kw, backend="cpu"), backend="eager",
                      fullgraph=False)
    torch.testing.assert_close(f(*args), prefix_attention_ref(*args, **kw), atol=2e-6,
                               rtol=1e-5)


# -- cascade decode path (csrc/cpu/attention_decode.cpp) ----
DECODE = {
    "one_entry_all_rows": dict(B=5, Hq=4, Hkv=2, Sq=1, Skv=20, D=16, N=1, P=33),
    "many_entries_shuffled": dict(B=12, Hq=4, Hkv=2, Sq=1, Skv=9, D=16, N=6, P=70,
                                  lens=[70, 0, 5, 64, 1, 33],
                                  ids=[3, 0, 5, 3, 2, 0, 4, 1, 3, 5, 0, 2]),
    "sq4_lens_leftpad": dict(B=4, Hq=6, Hkv=2, Sq=4, Skv=30, D=8, N=3, P=40, lens=[40, 7, 19],
                             ids=[2, 0, 2, 1], pad="left"),
    "sq4_rightpad_mqa": dict(B=3, Hq=4, Hkv=1, Sq=4, Skv=12, D=8, N=2, P=9, ids=[1, 1, 0],
                             pad="right"),
    # one row with a long prefix and long own KV: both parts are split along the keys
    "split_kv_one_row": dict(B=1, Hq=4, Hkv=2, Sq=1, Skv=200, D=16, N=1, P=300),
}


@pytest.mark.parametrize("path", ["cascade", "rows"])
@pytest.mark.parametrize("case", list(DECODE))
def test_decode_paths_match_reference(case, path, monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_CPU_PATH", path)
    args, kw = make_inputs(**DECODE[case])
    for extra in ({}, dict(window=5), dict(softcap=3.0)):
        out, lse = prefix_attention(*args, **kw, **extra, backend="cpu", return_lse=True)
        truth, tlse = prefix_attention_ref(*args, **kw, **extra, return_lse=True)
        torch.testing.assert_close(out, truth, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, tlse, atol=1e-5, rtol=0)


def test_decode_cascade_half_precision(monkeypatch):
    monkeypatch.setenv("PREFIX_ATTN_CPU_PATH", "cascade")
    for dtype in (torch.bfloat16, torch.float16):
        args, kw = make_inputs(dtype=dtype, **DECODE["many_entries_shuffled"])
        out = prefix_attention(*args, **kw, backend="cpu")
        assert_close_fa(out, prefix_attention_ref(*args, **kw),
                        prefix_attention_ref(*args, **kw, upcast=False))


def test_decode_cascade_is_deterministic_and_agrees_with_rows(monkeypatch):
    args, kw = make_inputs(**DECODE["split_kv_one_row"])
    monkeypatch.setenv("PREFIX_ATTN_CPU_PATH", "cascade")
    a = prefix_attention(*args, **kw, backend="cpu")
    assert torch.equal(a, prefix_attention(*args, **kw, backend="cpu"))
    monkeypatch.setenv("PREFIX_ATTN_CPU_PATH", "rows")
    torch.testing.assert_close(a, prefix_attention(*args, **kw, backend="cpu"), atol=1e-6,
                               rtol=1e-5)


@pytest.mark.parametrize("shape", [dict(B=4, Hq=4, Hkv=2, Sq=1, Skv=300, D=32, N=1, P=200),
                                   dict(B=3, Hq=4, Hkv=2, Sq=5, Skv=70, D=16, N=3, P=90,
                                        lens=[90, 37, 0], ids=[1, 0, 1], pad="left")])
def test_results_do_not_depend_on_the_thread_count(shape):
    """The decode path's key splits and its path rule followed torch.get_num_threads(): the
    output and every gradient differed in the last bits between 1 and 2 threads (a DataLoader
    worker, OMP_NUM_THREADS, another thread's set_num_threads)."""
    args, kw = make_inputs(requires_grad=True, **shape)
    threads = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            out = prefix_attention(*args, **kw, backend="cpu")
            got.append((out, *torch.autograd.grad(out.square().sum(), args)))
    finally:
        torch.set_num_threads(threads)
    for other in got[1:]:
        for a, b in zip(got[0], other):
            assert torch.equal(a, b)


def test_missing_extension_fails_softly():
    """Without prefix_attn._C the cpu backend is just unavailable; the API still works."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'prefix_attn._C':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, prefix_attn\n"
        "from prefix_attn.backends import available_backends, load_errors\n"
        "assert 'cpu' not in available_backends(), available_backends()\n"
        "assert any('cpp_backend' in m for m in load_errors()), load_errors()\n"
        "q = torch.randn(1, 2, 3, 8)\n"
        "out = prefix_attn.prefix_attention(q, q, q)\n"
        "assert out.shape == q.shape\n"
        "try:\n"
        "    prefix_attn.prefix_attention(q, q, q, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'C++ extension prefix_attn._C does not load' in str(e), e\n"
        "    assert 'pip install --no-build-isolation -e .' in str(e) and 'circular' not in str(e), e\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PREFIX_ATTN_BACKEND": ""})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("stride", [2**31, 2**32 + 3])
def test_a_stride_beyond_32_bits_is_read_right(stride):
    """A size-1 sequence dim may carry any stride (a legal view of D elements): the fp32 path
    gave it to BLAS as a 32-bit leading dim, and MKL returned garbage (1.95 off) after a
    message on stdout (from a sanitizer audit). Such tiles are copied now."""
    g = torch.Generator().manual_seed(0)
    B, H, D = 1, 2, 16
    q = torch.randn(B, H, 3, D, generator=g)
    base = torch.randn(2, B * H * D, generator=g)
    k, v = (t.as_strided((B, H, 1, D), (H * D, D, stride, 1)) for t in base)
    torch.testing.assert_close(prefix_attention(q, k, v, causal=False, backend="cpu"),
                               prefix_attention_ref(q, k, v, causal=False), atol=2e-6, rtol=1e-5)
    pk, pv = (t.as_strided((1, H, 1, D), (H * D, D, stride, 1)) for t in base)
    empty = q.new_zeros(B, H, 0, D)
    torch.testing.assert_close(prefix_attention(q, empty, empty, pk, pv, causal=False, backend="cpu"),
                               prefix_attention_ref(q, empty, empty, pk, pv, causal=False),
                               atol=2e-6, rtol=1e-5)


def test_empty_inputs_with_a_strided_last_dim_are_accepted():
    """An empty view with a last-dim stride other than 1 ([..., ::2] of zero keys): nothing is
    read, and the torch backend took it; the C++ op refused it ("contiguous last dimension")."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, generator=g, requires_grad=True)
    kv = torch.randn(1, 2, 0, 16, generator=g)[..., ::2]
    pk = torch.randn(1, 2, 4, 16, generator=g)[..., ::2]
    out = prefix_attention(q, kv, kv, pk, pk, backend="cpu")
    torch.testing.assert_close(out, prefix_attention_ref(q, kv, kv, pk, pk), atol=2e-6, rtol=1e-5)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_the_fused_backward_is_not_chosen_for_large_prefix_partials():
    """The fused backward keeps a prefix-gradient partial per (row, kv head): at B 32, Hkv 4,
    P 2048, D 64 its peak grew by 147 MB for a 4 MB gradient (the split path: 19 MB, and not
    slower). The path rule bounds the partials now. Peak RSS of a backward, in a fresh process."""
    script = """
import resource, torch
from prefix_attn import prefix_attention
g = torch.Generator().manual_seed(0)
B, Hkv, S, D, P = 32, 4, 32, 64, 2048
q = torch.randn(B, 2 * Hkv, S, D, generator=g, requires_grad=True)
k, v = (torch.randn(B, Hkv, S, D, generator=g, requires_grad=True) for _ in range(2))
pk, pv = (torch.randn(1, Hkv, P, D, generator=g, requires_grad=True) for _ in range(2))
out = prefix_attention(q, k, v, pk, pv, backend="cpu")
dout = torch.randn_like(out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.autograd.grad(out, (q, k, v, pk, pv), dout)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    env = {k: v for k, v in os.environ.items() if k != "PREFIX_ATTN_CPU_BWD"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    grown_mb = float(run.stdout.split()[-1])
    assert grown_mb < 80, f"the backward's peak grew by {grown_mb:.0f} MB"
