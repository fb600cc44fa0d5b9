"""torch.compile's view of what each Triton kernel writes, checked on this CPU machine.

Under `torch.compile`, a `triton_op` body is traced and each `wrap_triton` launch becomes a
higher-order op whose mutated arguments Inductor finds by analysing the kernel's TTIR. The
analysis is conservative: a store through a pointer that *may* derive from an input (for
instance a value returned by a helper that was given that input's pointer) marks the input
as written. On an H200 (2026-11-28) that marked q, dO, LSE and Delta of the dQ kernel as
mutated, and the joint graph of a compiled training step failed with "a leaf Variable that
requires grad is being used in an in-place operation". This test runs the same analysis
(TTIR for an sm_90 target, no GPU needed) on every kernel, as launched by the real launchers,
and requires that each kernel writes exactly its outputs.
"""
import pytest

pytest.importorskip("triton")

from conftest import run_compiler_script  # noqa: E402

EXPECTED = {
    "_attn_fwd": ["LSE", "OUT"],
    "_bwd_delta": ["DELTA"],
    "_bwd_dkdv_own": ["DK", "DV"],
    "_bwd_dkdv_prefix": ["DPK", "DPV"],
    "_bwd_dq": ["DQ"],
    "_cascade_prefix": ["LP", "OP"],
    "_cascade_own": ["LP", "OP"],
    "_cascade_merge": ["LSE", "OUT"],
}

_SCRIPT = r'''
import json
import torch, triton
from triton.backends.compiler import GPUTarget


class _Sm90Driver:  # TTIR generation asks the active driver for its target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(_Sm90Driver())
import torch._higher_order_ops.triton_kernel_wrap as tkw
from prefix_attn.kernels import bwd, decode, fwd

launches = []


class _Capture:  # stands in for wrap_triton: records the kernel and its named arguments
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            fn = self.kernel.fn if hasattr(self.kernel, "configs") else self.kernel  # Autotuner
            named = dict(zip(fn.arg_names, args))
            named.update(kwargs)
            launches.append((fn.__name__, self.kernel, named))
        return call


fwd.wrap_triton = bwd.wrap_triton = decode.wrap_triton = _Capture
B, Hq, Hkv, S, D, P = 2, 4, 2, 64, 64, 16
h = torch.float16
q, k, v = torch.randn(B, Hq, S, D, dtype=h), torch.randn(B, Hkv, S, D, dtype=h), torch.randn(B, Hkv, S, D, dtype=h)
pk, pv = torch.randn(1, Hkv, P, D, dtype=h), torch.randn(1, Hkv, P, D, dtype=h)
ids, lens = torch.zeros(B, dtype=torch.long), torch.tensor([P])
out, lse = torch.empty_like(q), torch.empty(B, Hq, S)
fwd.attn_fwd(q, k, v, pk, pv, ids, lens, None, out, lse, True, 0.125, -1, 0.0)
grads = [torch.empty_like(t) for t in (q, k, v, pk, pv)]
bwd.attn_bwd(torch.randn_like(q), q, k, v, pk, pv, ids, lens, None, out, lse, lse, *grads,
             True, 0.125, -1, 0.0)
q1, k1 = torch.randn(8, Hq, 1, D, dtype=h), torch.randn(8, Hkv, 600, D, dtype=h)
decode.cascade_fwd(q1, k1, k1.clone(), pk, pv, torch.zeros(8, dtype=torch.long), lens, None,
                   torch.empty_like(q1), torch.empty(8, Hq, 1), True, 0.125, -1, 0.0)
writes = {}
for name, kernel, named in launches:
    acc = tkw.identify_accessed_tensors(kernel, named, {})
    writes[name] = sorted(d.name for d in acc.read_writes.writes)
print("RESULT " + json.dumps(writes))
'''


@pytest.fixture(scope="module")
def writes(tmp_path_factory):
    return run_compiler_script(
        _SCRIPT, tmp_path_factory.mktemp("triton_cache"), timeout=300,
        skip_if={("identify_accessed_tensors", "AttributeError"):
                 "this torch has no identify_accessed_tensors (private API moved)"})


@pytest.mark.parametrize("kernel", list(EXPECTED))
def test_kernel_writes_only_its_outputs(writes, kernel):
    assert kernel in writes, f"{kernel} was not launched (launched: {sorted(writes)})"
    assert writes[kernel] == EXPECTED[kernel]
