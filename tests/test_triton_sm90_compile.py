"""Every Triton kernel compiles for a Hopper GPU (sm_90) on this CPU-only machine.

The interpreter tests run the kernels' logic but not Triton's compiler, which rejects things
the interpreter accepts (non-constexpr globals, dtype mismatches in tl.dot, bad layouts).
`triton.compile` with an explicit target needs no GPU: it goes through TTIR, TTGIR, LLVM
and PTX to a cubin with the ptxas that ships with Triton. It runs in a subprocess without
TRITON_INTERPRET (under the interpreter the kernels are not compilable objects); small
tiles and every feature flag on keep each build to a few seconds.
"""
import pytest

pytest.importorskip("triton")

from conftest import run_compiler_script  # noqa: E402

KERNELS = ["fwd", "dkdv_own", "dkdv_own_split", "dkdv_prefix", "dkdv_prefix_hoist", "dq", "delta",
           "cascade_prefix", "cascade_own", "cascade_merge"]

_SCRIPT = r'''
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prefix_attn.kernels import bwd, decode, fwd

PTRS = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "PK": "*fp16", "PV": "*fp16",
        "OUT": "*fp16", "O": "*fp16", "DO": "*fp16", "DK": "*fp16", "DV": "*fp16",
        "DPK": "*fp16", "DPV": "*fp16", "DQ": "*fp16",
        "PIDS": "*i64", "PLENS": "*i64", "ROWS": "*i64", "ROW_OFFS": "*i64",
        "TILE_OFFS": "*i64", "TILE_ENTRY": "*i64", "KPM": "*u8",
        "LSE": "*fp32", "DLSE": "*fp32", "DELTA": "*fp32", "OP": "*fp32", "LP": "*fp32"}
FLOATS = {"qk_scale", "softcap_inv", "softcap_log2"}
FLAGS = dict(D=40, G=3, CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True, SOFTCAP=True,
             DOT_PREC="tf32", BLOCK_D=64, BLOCK_M=32, BLOCK_N=32, SPLIT=False,
             HOIST=False, HAS_DLSE=True)
# without key padding the own dK/dV loop has its unmasked part
VARIANTS = {"dkdv_own_split": dict(HAS_KPM=False, SPLIT=True, G=4, HOIST=True),
            "dkdv_prefix_hoist": dict(G=4, HOIST=True)}
KERNELS = {"fwd": fwd._attn_fwd, "dkdv_own": bwd._bwd_dkdv_own,
           "dkdv_own_split": bwd._bwd_dkdv_own, "dkdv_prefix_hoist": bwd._bwd_dkdv_prefix,
           "dkdv_prefix": bwd._bwd_dkdv_prefix, "dq": bwd._bwd_dq, "delta": bwd._bwd_delta,
           "cascade_prefix": decode._cascade_prefix, "cascade_own": decode._cascade_own,
           "cascade_merge": decode._cascade_merge}
out = {}
for name, kernel in KERNELS.items():
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    const = {k: v for k, v in {**FLAGS, **VARIANTS.get(name, {})}.items() if k in fn.arg_names}
    if name in ("delta", "cascade_merge"):
        const["BLOCK_M"] = 16
    sig = {a: "constexpr" if a in const else PTRS.get(a, "fp32" if a in FLOATS else "i32")
           for a in fn.arg_names}
    try:
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": 2})
        out[name] = {"ok": bool(c.asm.get("cubin")), "shared": c.metadata.shared}
    except Exception as e:  # reported per kernel by the test
        out[name] = {"ok": False, "error": f"{type(e).__name__}: {str(e)[-800:]}"}
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    # a private cache: really compile, and never race other processes on a shared cache
    missing = "Triton's bundled ptxas is not available"
    return run_compiler_script(_SCRIPT, tmp_path_factory.mktemp("triton_cache"),
                               skip_if={("ptxas", "not found"): missing,
                                        ("ptxas", "No such file"): missing})


@pytest.mark.parametrize("name", KERNELS)
def test_kernel_compiles_for_sm90(builds, name):
    res = builds[name]
    assert res["ok"], res.get("error")
    assert res["shared"] <= 227 * 1024


_CASCADE_SCRIPT = r'''
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prefix_attn.kernels import decode

H200 = 232448  # shared memory per block (opt-in), bytes
FLOATS = {"qk_scale", "softcap_inv", "softcap_log2"}
out = {}
for kname, block_m in (("own", 128), ("own", 16), ("prefix", 64)):
    kernel = decode._cascade_own if kname == "own" else decode._cascade_prefix
    for dtype, elsize in (("fp16", 2), ("fp32", 4)):
        block_n, stages = decode.cascade_tiles(block_m, 256, elsize, H200)
        const = {k: v for k, v in dict(D=256, G=8, CAUSAL=True, HAS_WINDOW=False, HAS_KPM=False,
                                       SOFTCAP=False, DOT_PREC="ieee" if elsize == 4 else "tf32",
                                       BLOCK_D=256, BLOCK_M=block_m, BLOCK_N=block_n).items()
                 if k in kernel.arg_names}
        sig = {}
        for a in kernel.arg_names:
            if a in const:
                sig[a] = "constexpr"
            elif a in ("Q", "K", "V", "PK", "PV"):
                sig[a] = "*" + dtype
            elif a in ("OP", "LP"):
                sig[a] = "*fp32"
            elif a == "KPM":
                sig[a] = "*u8"
            elif a in ("PLENS", "ROWS", "ROW_OFFS", "TILE_OFFS", "TILE_ENTRY"):
                sig[a] = "*i64"
            else:
                sig[a] = "fp32" if a in FLOATS else "i32"
        c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4, "num_stages": stages})
        out[f"{kname} {dtype} BLOCK_M {block_m}"] = c.metadata.shared
print("RESULT " + json.dumps(out))
'''


@pytest.mark.slow
def test_cascade_tiles_fit_an_h200_at_head_dim_256(tmp_path):
    """The decode cascade launched fixed tiles (64 keys, 3 stages): at head dim 256 they
    needed 256 KiB (fp16, 128 query rows) to 416 KiB (fp32), over an H200's 227 KiB per
    block, which fails at launch (Triton's OutOfResources). The tiles are chosen to fit now;
    the compiler's own count for sm_90 is the judge."""
    shared = run_compiler_script(_CASCADE_SCRIPT, tmp_path / "cache",
                                 skip_if={("ptxas", "not found"): "no ptxas"})
    assert len(shared) == 6
    for name, nbytes in shared.items():
        assert nbytes <= 232448, (name, nbytes)


def test_cascade_tiles_prefer_the_largest_that_fits_with_a_margin():
    """64 keys and 3 stages where they fit (the tiles measured on an H200 at head dim 128);
    a smaller tile only when the estimate plus the margin passes the budget."""
    from prefix_attn.kernels.autotune import smem_estimate
    from prefix_attn.kernels.decode import SMEM_MARGIN, cascade_tiles

    assert cascade_tiles(16, 64, 2, 232448) == (64, 3)
    assert cascade_tiles(64, 128, 2, 232448) == (64, 3)
    need = smem_estimate(128, 64, 128, 3, 2)
    assert cascade_tiles(128, 128, 2, need + SMEM_MARGIN) == (64, 3)
    assert cascade_tiles(128, 128, 2, need + SMEM_MARGIN - 1) != (64, 3)
