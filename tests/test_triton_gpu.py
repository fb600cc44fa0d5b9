"""The triton backend on a CUDA GPU at real sizes (skipped without CUDA).

Run by bench/gpu.sh (with PREFIX_ATTN_TRITON_ONE_CONFIG=1). Correctness follows the
flash-attention rule against the reference in fp32 (truth) and in the input dtype
(baseline); the reference is evaluated one batch row at a time to bound its memory
(the [Hq, S, P + S] score matrix of one row at S = 4096 is 2.3 GB in fp32).
"""
import pytest
import torch

pytest.importorskip("triton")

from prefix_attn import prefix_attention, prefix_attention_ref  # noqa: E402
from conftest import assert_close_fa  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

B, HQ, HKV, D, S = 8, 32, 8, 128, 4096


def _inputs(dtype, P, N=1, Sq=S, Skv=S, Bn=B, Hq=HQ, Hkv=HKV, Dh=D, seed=0, lens=None,
            pad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)

    args = (rnd(Bn, Hq, Sq, Dh), rnd(Bn, Hkv, Skv, Dh), rnd(Bn, Hkv, Skv, Dh),
            rnd(N, Hkv, P, Dh), rnd(N, Hkv, P, Dh))
    kw = {"prefix_ids": torch.randint(0, N, (Bn,), generator=g, device="cuda")}
    if lens is not None:
        kw["prefix_lens"] = torch.tensor(lens, device="cuda")
    if pad:  # left padding of a different amount per row
        m = torch.ones(Bn, Skv, dtype=torch.bool, device="cuda")
        for b in range(Bn):
            m[b, : 37 * b] = False
        kw["key_padding_mask"] = m
    return args, kw


def _ours(args, kw, dout, **opts):
    leaves = [t.detach().requires_grad_() for t in args]
    out = prefix_attention(*leaves, **kw, **opts, backend="triton")
    return out, torch.autograd.grad(out, leaves, dout)


def _ref_rowwise(args, kw, dout, upcast, **opts):
    """Reference out and grads computed one batch row at a time; prefix grads summed in fp32."""
    q, k, v, pk, pv = args
    outs, dqs, dks, dvs = [], [], [], []
    dpk = torch.zeros(pk.shape, device="cuda", dtype=torch.float32)
    dpv = torch.zeros_like(dpk)
    for b in range(q.shape[0]):
        leaves = [t.detach().requires_grad_() for t in (q[b:b + 1], k[b:b + 1], v[b:b + 1], pk, pv)]
        kwb = {name: (t[b:b + 1] if name in ("prefix_ids", "key_padding_mask") else t)
               for name, t in kw.items()}
        out = prefix_attention_ref(*leaves, **kwb, **opts, upcast=upcast)
        gq, gk, gv, gpk, gpv = torch.autograd.grad(out, leaves, dout[b:b + 1])
        outs.append(out.detach())
        dqs.append(gq)
        dks.append(gk)
        dvs.append(gv)
        dpk += gpk.float()
        dpv += gpv.float()
        del out, leaves
    return torch.cat(outs), (torch.cat(dqs), torch.cat(dks), torch.cat(dvs), dpk, dpv)


def _check_fwd_bwd(args, kw, **opts):
    """Ours vs the fp32 reference (truth) and the same-dtype reference (baseline), forward and
    every gradient, under the flash-attention rule."""
    dout = torch.randn(args[0].shape, device="cuda", dtype=args[0].dtype)
    out, grads = _ours(args, kw, dout, **opts)
    truth, tgrads = _ref_rowwise(args, kw, dout, upcast=True, **opts)
    base, bgrads = _ref_rowwise(args, kw, dout, upcast=False, **opts)
    assert_close_fa(out, truth, base, atol=1e-3)
    for name, a, t, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, tgrads, bgrads):
        assert_close_fa(a, t, b, atol=1e-3, name=name)


@pytest.fixture(autouse=True)
def _no_tf32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 truth must be fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev
    torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("P", [16, 128, 256])
def test_real_size_matches_reference(P, dtype):
    args, kw = _inputs(dtype, P)
    _check_fwd_bwd(args, kw)


def test_bank_padding_window_softcap_at_medium_size():
    args, kw = _inputs(torch.bfloat16, 96, N=3, Sq=1000, Skv=1200, Bn=4, lens=[96, 17, 0],
                       Dh=72, pad=True, seed=1)
    _check_fwd_bwd(args, kw, window=300, softcap=30.0)


@pytest.mark.parametrize("Dh", [16, 96, 256])
def test_head_dims(Dh):
    """The smallest and largest head dims, and one padded to the next power of two, with GQA,
    two bank entries of different lengths and left padding (one config per kernel)."""
    args, kw = _inputs(torch.bfloat16, 40, N=2, Sq=300, Skv=333, Bn=3, Hq=8, Hkv=2, Dh=Dh,
                       lens=[40, 7], pad=True, seed=5)
    _check_fwd_bwd(args, kw)


@pytest.mark.parametrize("dtype,Hq,Hkv,Sq", [(torch.float16, 8, 1, 12), (torch.float16, 32, 4, 16),
                                              (torch.float32, 8, 2, 1)], ids=str)
def test_cascade_decode_at_head_dim_256(dtype, Hq, Hkv, Sq):
    """Cascade shapes whose fixed tiles needed more shared memory than an H200 has (Gemma-like
    MQA with a 12-token chunk, 16 speculative tokens, fp32): tiles chosen to fit now."""
    from prefix_attn.triton_backend import _cascade

    args, kw = _inputs(dtype, 128, N=1, Sq=Sq, Skv=1024, Bn=2, Hq=Hq, Hkv=Hkv, Dh=256, seed=3)
    assert _cascade(*args[:2], args[3])
    out = prefix_attention(*args, **kw, backend="triton")
    truth = prefix_attention_ref(*args, **kw)
    base = prefix_attention_ref(*args, **kw, upcast=False)
    assert_close_fa(out, truth, base, atol=1e-3)


def test_decode_many_entries():
    args, kw = _inputs(torch.float16, 200, N=7, Sq=1, Skv=3000, Bn=48, lens=[200, 1, 0, 64, 150, 9, 33],
                       seed=2)
    out = prefix_attention(*args, **kw, backend="triton")
    truth = prefix_attention_ref(*args, **kw)
    base = prefix_attention_ref(*args, **kw, upcast=False)
    assert_close_fa(out, truth, base, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,extra", [("bank_rightpad", "window"), ("P17_gqa3", "softcap"),
                                         ("mqa_leftpad", "noncausal")])
def test_lse_gradient_small_shapes(shape, extra, dtype):
    """The LSE's gradient (folded into Delta by _bwd_delta), compiled, every dtype."""
    from conftest import CONTRACT_SHAPES
    from test_lse_grad import EXTRA, check_lse_grad
    check_lse_grad("triton", CONTRACT_SHAPES[shape], EXTRA[extra], dtype, device="cuda")


def test_real_size_backward_is_bitwise_deterministic():
    args, kw = _inputs(torch.bfloat16, 128, N=3, lens=[128, 64, 100], seed=3)
    dout = torch.randn(args[0].shape, device="cuda", dtype=torch.bfloat16)
    _, g1 = _ours(args, kw, dout)
    _, g2 = _ours(args, kw, dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_inductor_compile_fullgraph():
    args, kw = _inputs(torch.bfloat16, 64, Sq=512, Skv=512, Bn=2, seed=4)
    leaves = [t.detach().requires_grad_() for t in args]

    def f(q, k, v, pk, pv):
        return prefix_attention(q, k, v, pk, pv, **kw, backend="triton") * 2

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True)(*leaves)
    ref = f(*leaves)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.float().sum(), leaves)
    g2 = torch.autograd.grad(ref.float().sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """Triton launches on the current device: the backend makes the tensors' device current."""
    torch.cuda.set_device(0)
    args, kw = _inputs(torch.float16, 33, N=2, Sq=70, Skv=90, Bn=3, Hq=8, Hkv=2, Dh=64)
    args = [t.to("cuda:1") for t in args]
    kw = {name: t.to("cuda:1") for name, t in kw.items()}
    dout = torch.randn_like(args[0])
    out, grads = _ours(args, kw, dout)
    torch.cuda.synchronize("cuda:1")
    assert out.device == torch.device("cuda:1")
    truth = prefix_attention_ref(*args, **kw)
    base = prefix_attention_ref(*args, **kw, upcast=False)
    assert_close_fa(out, truth, base, atol=1e-3)
    assert all(torch.isfinite(g).all() for g in grads)


def test_too_little_shared_memory_falls_back_to_another_backend(monkeypatch):
    """On a GPU whose per-block shared memory no config of some kernel fits (sm_86/89: 99 KiB,
    fp32 at head dim 256), the triton backend is not chosen (its launch would fail)."""
    from prefix_attn import triton_backend
    monkeypatch.setattr(triton_backend, "smem_budget", lambda t: 101376)
    args, kw = _inputs(torch.float32, 9, Sq=20, Skv=30, Bn=2, Hq=4, Hkv=2, Dh=256)
    with pytest.raises(ValueError, match="shared memory"):
        prefix_attention(*args, **kw, backend="triton")
    out = prefix_attention(*args, **kw)   # another backend (cuda, or the torch reference)
    torch.testing.assert_close(out, prefix_attention_ref(*args, **kw), atol=2e-5, rtol=2e-5)


def test_decode_index_tensors_made_during_graph_capture_are_not_reused(monkeypatch):
    """The one-entry cascade caches its index tensors per shape: made inside a CUDA graph
    capture they hold nothing until the graph's first replay, so an eager call of that shape
    before it read garbage. They are not cached while capturing."""
    monkeypatch.setenv("PREFIX_ATTN_TRITON_CASCADE", "1")
    warm, _ = _inputs(torch.float16, 40, Sq=1, Skv=50, Bn=5, Hq=8, Hkv=2, Dh=64)
    prefix_attention(*warm, backend="triton")          # compiles the kernels outside the capture
    args, kw = _inputs(torch.float16, 40, Sq=1, Skv=50, Bn=7, Hq=8, Hkv=2, Dh=64, seed=3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        captured = prefix_attention(*args, backend="triton")
    torch.cuda.current_stream().wait_stream(stream)
    out = prefix_attention(*args, backend="triton")     # eager, same shape, before any replay
    truth = prefix_attention_ref(*args)
    base = prefix_attention_ref(*args, upcast=False)
    assert_close_fa(out, truth, base, atol=1e-3)
    graph.replay()
    torch.cuda.synchronize()
    assert_close_fa(captured, truth, base, atol=1e-3)
