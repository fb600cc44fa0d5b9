"""The `cuda` backend (the extension's CUDA kernels) against the reference: the contract cases
of test_cpp_backend on GPU tensors, determinism, zero gradients of unused prefix entries.
Skipped without CUDA (and without an extension built with its CUDA part)."""
import pytest
import torch

from conftest import check_contract, check_deterministic_backward, check_unused_entries_zero_grad
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
    check_deterministic_backward("cuda", device="cuda")


def test_cuda_unused_entries_get_zero_grad():
    check_unused_entries_zero_grad("cuda", device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,extra", [("bank_rightpad", "window"), ("P17_gqa3", "softcap")])
def test_cuda_lse_gradient(shape, extra, dtype):
    from conftest import CONTRACT_SHAPES
    from test_lse_grad import EXTRA as LSE_EXTRA, check_lse_grad
    check_lse_grad("cuda", CONTRACT_SHAPES[shape], LSE_EXTRA[extra], dtype, device="cuda")
