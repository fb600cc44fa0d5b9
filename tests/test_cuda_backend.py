"""The `cuda` backend (the extension's CUDA kernels) against the reference: the contract cases
of test_cpp_backend on GPU tensors, determinism, zero gradients of unused prefix entries.
Skipped without CUDA (and without an extension built with its CUDA part)."""
import pytest
import torch

from prefix_attn import prefix_attention
from conftest import check_contract, make_inputs
from test_cpp_backend import EXTRA, SHAPES


def _cuda_backend_ready():
    if not torch.cuda.is_available():
        return False
    from prefix_attn.backends import available_backends
    return "cuda" in available_backends()


pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _cuda_backend_ready(),
                                 reason="needs CUDA and the extension's CUDA kernels")]

SHAPES_GPU = dict(SHAPES, head_dim_256=dict(B=2, Hq=4, Hkv=2, Sq=9, Skv=40, D=256, P=33))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("extra", list(EXTRA))
@pytest.mark.parametrize("shape", list(SHAPES_GPU))
def test_cuda_backend_matches_reference(shape, extra, dtype):
    check_contract("cuda", SHAPES_GPU[shape], EXTRA[extra], dtype, device="cuda")


def test_cuda_backward_is_bitwise_deterministic():
    args, kw = make_inputs(B=6, Hq=4, Hkv=2, Sq=40, Skv=70, N=2, P=70, lens=[70, 3],
                           ids=[0, 1, 0, 0, 1, 0], pad="left", device="cuda",
                           requires_grad=True)
    runs = []
    for _ in range(2):
        out = prefix_attention(*args, **kw, backend="cuda")
        runs.append(torch.autograd.grad(out.square().sum(), args))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cuda_unused_entries_get_zero_grad():
    args, kw = make_inputs(B=3, N=3, P=6, lens=[6, 2, 4], ids=[1, 1, 0], device="cuda",
                           requires_grad=True)
    out = prefix_attention(*args, **kw, backend="cuda")
    dpk, dpv = torch.autograd.grad(out.sum(), args[3:])
    for d in (dpk, dpv):
        assert (d[2] == 0).all() and (d[1, :, 2:] == 0).all()
