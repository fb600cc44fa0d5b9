"""Edges of the public API that a kernel-only test does not reach: inputs whose rows overlap
(an expand over the sequence, an unfold), autodiff modes the ops cannot serve (double backward,
forward-mode AD, torch.func.grad/jvp: an error, never a silent zero), torch.compile with a
symbolic head dim and with out-of-range ids (checked on the device there), numpy scalars."""
import os

import pytest
import torch

import prefix_attn
from conftest import assert_close_fa, make_inputs
from prefix_attn import available_backends, prefix_attention, prefix_attention_ref

interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                                      reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["torch", "cpu", pytest.param("triton", marks=[pytest.mark.interpreter, interpreter_only])]


def _need(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    if backend not in available_backends() and backend != "triton":
        pytest.skip(f"backend {backend} not available")


def _overlapping(t, how):
    """A view of ``t``'s shape whose rows are not distinct: stride 0 along the sequence, or
    rows ``D // 2`` elements apart (an unfold)."""
    B, H, S, D = t.shape
    if how == "expand":
        return t[:, :, :1].expand(B, H, S, D)
    flat = t.reshape(B, H, -1)[..., : (S - 1) * (D // 2) + D].contiguous()
    return flat.unfold(2, D, D // 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how,D", [("expand", 1), ("expand", 8), ("unfold", 8)])
@pytest.mark.parametrize("which", ["q", "k", "v", "prefix_k"])
def test_overlapping_rows_forward_and_backward(backend, how, which, D):
    """The C++ cpu kernels hand the row stride to BLAS as a leading dimension; rows closer than
    D apart made it reject the call (fp32: wrong outputs, zero dq). Now such inputs are copied."""
    _need(backend)
    (q, k, v, pk, pv), kw = make_inputs(B=2, Hq=2, Hkv=1, Sq=5, Skv=6, D=D, P=4, pad="left")
    args = dict(q=q, k=k, v=v, prefix_k=pk, prefix_v=pv)
    args[which] = _overlapping(args[which], how)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args.items()}
    views = dict(leaves)
    views[which] = _overlapping(leaves[which], how)  # the gradient flows back through the view
    assert views[which].stride(-2) < D or D == 1
    out = prefix_attention(*views.values(), backend=backend, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(leaves.values()), g)
    truth_in = {n: t.detach().double().requires_grad_() for n, t in leaves.items()}
    truth_views = dict(truth_in)
    truth_views[which] = _overlapping(truth_in[which], how)
    truth = prefix_attention_ref(*truth_views.values(), **kw)
    truth_grads = torch.autograd.grad(truth, list(truth_in.values()), g.double())
    base_views = dict(leaves)
    base_views[which] = _overlapping(leaves[which], how)
    base = prefix_attention_ref(*base_views.values(), upcast=False, **kw)
    base_grads = torch.autograd.grad(base, list(leaves.values()), g)
    assert_close_fa(out, truth, base)
    for name, x, t, b in zip(leaves, grads, truth_grads, base_grads):
        assert_close_fa(x, t, b, atol=1e-4, name=f"d{name}")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_double_backward_raises_and_create_graph_alone_works(backend):
    _need(backend)
    (q, k, v, pk, pv), kw = make_inputs(requires_grad=True)
    out = prefix_attention(q, k, v, pk, pv, backend=backend, **kw)
    dq, = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    want, = torch.autograd.grad(prefix_attention(q, k, v, pk, pv, backend=backend, **kw).pow(2).sum(), q)
    torch.testing.assert_close(dq, want, rtol=0, atol=0)  # first order: as without create_graph
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(dq.sum(), [q, k], allow_unused=True)
    out = prefix_attention(q, k, v, pk, pv, backend=backend, **kw)
    dq, = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):  # a gradient penalty
        (out.sum() + dq.square().sum()).backward()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_mode_and_func_transforms(backend):
    _need(backend)
    (q, k, v, pk, pv), kw = make_inputs()

    def f(q_):
        return prefix_attention(q_, k, v, pk, pv, backend=backend, **kw)

    with pytest.raises(NotImplementedError, match="torch.func.grad"):
        torch.func.grad(lambda q_: f(q_).sum())(q)
    with pytest.raises(NotImplementedError, match="torch.func.jvp"):
        torch.func.jvp(f, (q,), (torch.ones_like(q),))
    from torch.autograd import forward_ad

    with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward-mode"):
        f(forward_ad.make_dual(q, torch.ones_like(q)))
    batched = torch.vmap(f)(torch.stack([q, 2 * q]))  # vmap works
    torch.testing.assert_close(batched[1], f(2 * q), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forward_mode_around_a_compiled_call_is_refused(backend):
    """Inside torch.compile the refusal was skipped: jvp / jacfwd / forward_ad around or inside
    a compiled call gave a zero (or no) tangent, silently."""
    _need(backend)
    from torch.autograd import forward_ad

    (q, k, v, pk, pv), kw = make_inputs()

    def f(q_):
        return prefix_attention(q_, k, v, pk, pv, backend=backend, **kw)

    def dual(x, t):
        with forward_ad.dual_level():
            return forward_ad.unpack_dual(f(forward_ad.make_dual(x, t))).tangent

    t = torch.ones_like(q)
    torch._dynamo.reset()
    for run in (lambda: torch.compile(lambda x, tt: torch.func.jvp(f, (x,), (tt,)), backend="eager")(q, t),
                lambda: torch.compile(torch.func.jacfwd(lambda x: f(x).sum()), backend="eager")(q),
                lambda: torch.compile(dual, backend="eager")(q, t),
                lambda: torch.func.jvp(torch.compile(f, backend="eager"), (q,), (t,))):
        with pytest.raises(NotImplementedError, match="forward-mode|torch.func.jvp"):
            run()


def test_torch_export_of_a_model_called_with_prefixes():
    """Non-strict export of an HF model with prefixes=: the bank's index tensors are fake in
    the trace, and recording their known range read a data pointer they lack (it worked only
    after the same selection had run eagerly, filling the bank's caches)."""
    pytest.importorskip("transformers")
    from prefix_attn.tiny import tiny_model

    model = tiny_model("llama")
    bank = prefix_attn.PrefixBank.attach(model)
    bank.add("a", torch.randn(bank.num_layers, bank.num_kv_heads, 3, bank.head_dim),
             torch.randn(bank.num_layers, bank.num_kv_heads, 3, bank.head_dim))
    ids, mask = torch.randint(3, 100, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    kw = dict(attention_mask=mask, use_cache=False, prefixes="a")
    program = torch.export.export(model, (ids,), kwargs=kw, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids, **kw).logits, model(ids, **kw).logits)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_jit_trace_with_the_default_scale_and_a_refusal_on_triton(backend, monkeypatch):
    """torch.jit.trace reads the head dim as a tensor: the default scale D ** -0.5 was refused
    as "scale must be a finite float" although none was given. The triton op keeps no range
    check in a trace: refused by name there."""
    _need(backend)
    (q, k, v, pk, pv), kw = make_inputs(B=3, N=2, ids=[1, 0, 1], lens=[7, 3])
    args = (q, k, v, pk, pv, kw["prefix_ids"], kw["prefix_lens"])

    def f(q, k, v, pk, pv, ids, lens, backend=backend):
        return prefix_attention(q, k, v, pk, pv, prefix_ids=ids, prefix_lens=lens, backend=backend)

    traced = torch.jit.trace(f, args, check_trace=False)
    torch.testing.assert_close(traced(*args), f(*args))
    if "triton" in available_backends():
        with pytest.raises(NotImplementedError, match="torch.jit.trace of prefix_attention on the triton"):
            torch.jit.trace(lambda *a: f(*a, backend="triton"), args, check_trace=False)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compile_with_a_dynamic_head_dim_and_default_scale(backend):
    _need(backend)
    torch._dynamo.reset()

    def f(q, k, v):
        return prefix_attention(q, k, v, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for S, D in ((4, 8), (5, 16)):
        q, k, v = (torch.randn(1, 2, S, D) for _ in range(3))
        torch.testing.assert_close(compiled(q, k, v), f(q, k, v), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_call_rejects_out_of_range_ids_and_lens(backend):
    """Eager calls read the ids on the host; a compiled graph cannot, so it asserts on the
    device: out-of-range ids used to read another entry (torch: -1 = the last one) or out of
    bounds (triton: a segfault under the interpreter)."""
    _need(backend)
    torch._dynamo.reset()
    (q, k, v, pk, pv), _ = make_inputs(B=2, N=2, P=3)

    def f(ids, lens):
        return prefix_attention(q, k, v, pk, pv, prefix_ids=ids, prefix_lens=lens, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    good_ids, good_lens = torch.tensor([1, 0]), torch.tensor([3, 2])
    torch.testing.assert_close(compiled(good_ids, good_lens), f(good_ids, good_lens))
    for ids, lens, what in ((torch.tensor([-1, 0]), good_lens, "prefix_ids"),
                            (torch.tensor([1000, 0]), good_lens, "prefix_ids"),
                            (good_ids, torch.tensor([3, 4]), "prefix_lens"),
                            (good_ids, torch.tensor([-2, 2]), "prefix_lens")):
        with pytest.raises(RuntimeError, match=f"{what} must lie in"):
            compiled(ids, lens)


def test_numpy_scalars_are_numbers():
    np = pytest.importorskip("numpy")
    (q, k, v, pk, pv), kw = make_inputs()
    want = prefix_attention(q, k, v, pk, pv, scale=0.25, window=3, softcap=2.0, causal=True, **kw)
    got = prefix_attention(q, k, v, pk, pv, scale=np.float32(0.25), window=np.int64(3),
                           softcap=np.float32(2.0), causal=np.bool_(True), **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        prefix_attention(q, k, v, causal=np.array([True, False]))


def test_meta_tensors_run_on_the_torch_backend():
    """DESIGN.md: the torch backend runs anywhere; on meta tensors it gives the shapes (this
    was "no backend accepts meta tensors")."""
    q = torch.empty(1, 2, 3, 8, device="meta")
    out = prefix_attn.prefix_attention(q, q, q)
    assert out.device.type == "meta" and out.shape == q.shape


def test_first_call_compiled_in_a_fresh_process_compiles_once():
    """The backend list was cached at the first attention call: a first call inside
    torch.compile wrote it while tracing, and the guard on it recompiled the whole graph at the
    second call. It is filled at import now (a fresh process: nothing called before)."""
    import subprocess
    import sys

    code = (
        "import torch, prefix_attn\n"
        "from torch._dynamo.utils import counters\n"
        "q = torch.randn(2, 4, 8, 16); k = torch.randn(2, 2, 8, 16); v = torch.randn(2, 2, 8, 16)\n"
        "f = torch.compile(lambda q, k, v: prefix_attn.prefix_attention(q, k, v), "
        "backend='eager', fullgraph=True)\n"
        "for _ in range(3): f(q, k, v)\n"
        "print('graphs', counters['stats']['unique_graphs'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "graphs 1", out.stdout
