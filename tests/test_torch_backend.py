"""The `torch` backend against the reference, forward and backward, fp32/fp16/bf16, and
the dispatch layer (backend choice, env override, strided inputs, empty shapes)."""
import pytest
import torch

import prefix_attn
from prefix_attn import prefix_attention, prefix_attention_ref
from conftest import (CONTRACT_EXTRA, CONTRACT_SHAPES, check_contract, check_deterministic_backward,
                      check_unused_entries_zero_grad, errors, make_inputs)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", list(CONTRACT_EXTRA))
@pytest.mark.parametrize("shape", list(CONTRACT_SHAPES))
def test_torch_backend_matches_reference(shape, extra, dtype):
    check_contract("torch", CONTRACT_SHAPES[shape], CONTRACT_EXTRA[extra], dtype)


def test_backward_is_deterministic():
    check_deterministic_backward("torch")


def test_unused_entries_and_positions_beyond_len_get_zero_grad():
    check_unused_entries_zero_grad("torch")


def test_chunked_queries_match(monkeypatch):
    # Force several query chunks: the result must not depend on the chunking.
    import prefix_attn.torch_backend as tb
    args, kw = make_inputs(B=2, Sq=11, Skv=15, N=2, P=5, lens=[5, 3], ids=[1, 0], pad="left",
                           requires_grad=True)
    kw.update(window=6)
    full = prefix_attention(*args, **kw, backend="torch")
    gfull = torch.autograd.grad(full.sum(), args)
    monkeypatch.setattr(tb, "_SCORE_BUDGET", 2 * 4 * (15 + 5) * 3)  # 3 queries a chunk
    part = prefix_attention(*args, **kw, backend="torch")
    gpart = torch.autograd.grad(part.sum(), args)
    torch.testing.assert_close(part, full)
    for a, b in zip(gpart, gfull):
        torch.testing.assert_close(a, b)


def test_strided_hf_views_without_copy():
    # HF passes q/k/v as [B, S, H, D] tensors transposed to [B, H, S, D].
    B, S, Hq, Hkv, D = 2, 6, 4, 2, 8
    q = torch.randn(B, S, Hq, D).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D).transpose(1, 2)
    pk, pv = torch.randn(Hkv, 3, D), torch.randn(Hkv, 3, D)
    out = prefix_attention(q, k, v, pk, pv)
    ref = prefix_attention_ref(q.contiguous(), k.contiguous(), v.contiguous(), pk, pv)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("shape", [dict(B=0), dict(Sq=0), dict(Skv=0), dict(Skv=0, P=0)])
def test_empty_dimensions(shape):
    args, kw = make_inputs(requires_grad=True, **shape)
    out, lse = prefix_attention(*args, **kw, backend="torch", return_lse=True)
    ref, rlse = prefix_attention_ref(*args, **kw, return_lse=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    if out.numel():
        out.sum().backward()
        assert not torch.isnan(args[0].grad).any()


def test_dispatch_env_and_listing(monkeypatch):
    assert "torch" in prefix_attn.available_backends()
    args, kw = make_inputs()
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "torch")
    out = prefix_attention(*args, **kw)
    torch.testing.assert_close(out, prefix_attention_ref(*args, **kw))
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        prefix_attention(*args, **kw)


def test_float64_goes_to_a_backend_that_supports_it():
    args, kw = make_inputs(dtype=torch.float64)
    out = prefix_attention(*args, **kw)
    assert out.dtype == torch.float64
    assert errors(out, prefix_attention_ref(*args, **kw)) < 1e-12


def test_torch_compile_traces_the_op():
    args, kw = make_inputs()
    fn = torch.compile(lambda *a: prefix_attention(*a, **kw, backend="torch"), backend="eager",
                       fullgraph=True)  # fullgraph: any graph break is an error
    torch.testing.assert_close(fn(*args), prefix_attention_ref(*args, **kw))


def test_opcheck_torch_ops():
    from prefix_attn.validation import normalize
    args, kw = make_inputs(B=2, N=2, P=4, lens=[4, 2], ids=[1, 0], pad="left", requires_grad=True)
    a = normalize(*args, **kw)
    torch.library.opcheck(torch.ops.prefix_attn.torch_fwd.default, a.op_args())
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in a.op_args()]
    out, lse = torch.ops.prefix_attn.torch_fwd(*plain)
    for dlse in (None, torch.randn_like(lse)):
        torch.library.opcheck(torch.ops.prefix_attn.torch_bwd.default,
                              [torch.randn_like(out)] + plain[:8] + [out, lse, dlse] + plain[8:])


DECODE = {  # issue 5's decode cases: the torch backend does one GEMM per entry in use
    "one_entry_all_rows_Sq1": dict(B=6, Sq=1, Skv=11, N=1, P=13, pad="left"),
    "shuffled_entries_Sq4": dict(B=7, Sq=4, Skv=9, N=4, P=10, lens=[10, 3, 0, 7],
                                 ids=[3, 0, 1, 3, 2, 0, 3], pad="left"),
    "shuffled_entries_Sq1_rightpad": dict(B=5, Sq=1, Skv=6, N=3, P=5, lens=[5, 1, 4],
                                          ids=[2, 2, 0, 1, 2], pad="right"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(DECODE))
def test_torch_backend_decode_cases(case, dtype):
    check_contract("torch", DECODE[case], {}, dtype)


def test_op_annotations_are_types_for_torch_2_4():
    """setup.py asks for torch>=2.4, whose custom_op reads only evaluated annotations: with
    `from __future__ import annotations` in torch_backend.py the backend failed to register
    there ("Parameter q has unsupported type torch.Tensor"), leaving only `cpu`."""
    from prefix_attn import torch_backend

    for op in (torch_backend.torch_fwd, torch_backend.torch_bwd):
        hints = op._init_fn.__annotations__
        assert hints and not any(isinstance(h, str) for h in hints.values()), hints
