"""What the Triton kernels compile to on Hopper, measured on a machine without a GPU.

Compiles the kernels of `prefix_attn.kernels` for sm_90 (Triton's own ptxas; no GPU needed)
with the specialisation the JIT gives them at the benchmark shape (bf16, head dim 128,
GQA 4, causal, every pointer and stride divisible by 16), disassembles the cubin with
Triton's cuobjdump and reports, per kernel, config and switch setting: registers, spill
stack, shared memory, and for each loop of the SASS its instruction count, its tensor-core
(HGMMA/HMMA) instructions and its local-memory (spill) instructions.

This is a proxy, not a timing: it tells whether a change removed work from a hot loop (a
loop issuing more warp instructions than its tensor cores need cycles is issue-bound), and
it is how the kernel switches of `bench_triton_gpu.ABLATIONS` were judged before a GPU
timed them.

Usage:
    python bench/sass_report.py                    # bench/results/sass_sm90.{json,md}
    python bench/sass_report.py --out DIR --quick  # one small case (the test's): sass_sm90_quick.*
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

# (kernel, (BLOCK_M, BLOCK_N, warps, stages), switches). The configs are the H200's autotune
# winners (kernels/autotune.py) and one neighbour.
CASES = [
    ("fwd", (128, 64, 8, 4), {}),
    ("dq", (128, 32, 8, 3), {"HOIST": True}),
    ("dkdv_own", (64, 128, 8, 2), {"SPLIT": False, "HOIST": False}),
    ("dkdv_own", (64, 128, 8, 2), {"SPLIT": True, "HOIST": False}),
    ("dkdv_own", (64, 128, 8, 2), {"SPLIT": True, "HOIST": True}),
    ("dkdv_own", (32, 128, 8, 3), {"SPLIT": False, "HOIST": False}),
    ("dkdv_own", (32, 128, 8, 3), {"SPLIT": True, "HOIST": False}),
    ("dkdv_own", (32, 128, 8, 3), {"SPLIT": True, "HOIST": True}),
    ("dkdv_prefix", (32, 128, 8, 3), {"HOIST": False}),
    ("dkdv_prefix", (32, 128, 8, 3), {"HOIST": True}),
]
QUICK = [("dkdv_own", (32, 32, 4, 2), {"SPLIT": True, "HOIST": True})]
SHAPE = dict(D=128, G=4, CAUSAL=True, HAS_WINDOW=False, HAS_KPM=False, SOFTCAP=False,
             DOT_PREC="tf32", BLOCK_D=128)
_POINTERS = {"Q", "K", "V", "PK", "PV", "DO", "DK", "DV", "DPK", "DPV", "DQ", "OUT"}


def _kernels():
    from prefix_attn.kernels import bwd, fwd
    return {"fwd": fwd._attn_fwd, "dq": bwd._bwd_dq, "dkdv_own": bwd._bwd_dkdv_own,
            "dkdv_prefix": bwd._bwd_dkdv_prefix}


def _signature(fn, const):
    """Argument types (bf16 tensors) and the divisibility-by-16 hints the JIT would add."""
    sig = {}
    for a in fn.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a in _POINTERS:
            sig[a] = "*bf16"
        elif a in ("PIDS", "PLENS", "ROWS", "ROW_OFFS"):
            sig[a] = "*i64"
        elif a == "KPM":
            sig[a] = "*u8"
        elif a in ("LSE", "DELTA"):
            sig[a] = "*fp32"
        elif a in ("qk_scale", "softcap_inv", "softcap_log2"):
            sig[a] = "fp32"
        else:
            sig[a] = "i32"
    # at B 8, Hq 32, S 4096, D 128 every pointer, stride and length is a multiple of 16
    # except the kv-head count and the window (-1)
    hinted = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
              if sig[a] not in ("constexpr", "fp32") and a not in ("Hkv", "window")}
    return sig, hinted


def compile_case(kernel: str, config, switches: dict) -> dict:
    """Compile one case for sm_90; returns its resource usage and per-loop statistics."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = _kernels()[kernel]
    fn = k.fn if hasattr(k, "configs") else k
    bm, bn, warps, stages = config
    const = {**SHAPE, **switches, "BLOCK_M": bm, "BLOCK_N": bn}
    const = {a: v for a, v in const.items() if a in fn.arg_names}
    sig, hinted = _signature(fn, const)
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=hinted),
                       target=GPUTarget("cuda", 90, 64),
                       options={"num_warps": warps, "num_stages": stages})
    sass, usage = _disassemble(c.asm["cubin"])
    return {"kernel": kernel, "config": list(config), "switches": switches,
            "registers": usage.get("REG"), "spill_stack_bytes": usage.get("STACK"),
            "shared_bytes": c.metadata.shared, "instructions": len(sass),
            "loops": loop_stats(sass)}


def _cuobjdump() -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Triton's cuobjdump not found at {path}")
    return path


def _disassemble(cubin: bytes):
    """[(address, instruction)] of the cubin's SASS and its resource usage (REG, STACK, ...)."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    ins = [(int(m.group(1), 16), m.group(2)) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", res)}
    return ins, usage


def loop_stats(ins) -> list:
    """One entry per loop (a branch to a lower address), in address order: instructions,
    tensor-core instructions (HGMMA, or HMMA for tiles too small for wgmma), local-memory
    (spill) loads and stores inside it."""
    loops = []
    for addr, text in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    out = []
    for lo, hi in sorted(loops):
        body = [t for a, t in ins if lo <= a <= hi]
        out.append({"instructions": len(body),
                    "mma": sum(bool(re.search(r"\bH(G)?MMA\b", t)) for t in body),
                    "spill_ops": sum(bool(re.search(r"\b(LDL|STL)\b", t)) for t in body)})
    return out


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [f"sm_90 SASS of the Triton kernels (triton {env['triton']}, {env['date'][:10]}; no "
             f"GPU: compiled and disassembled on {env['machine']}). bf16, head dim 128, GQA 4, "
             "causal; config = BLOCK_M, BLOCK_N, warps, stages. Per loop: instructions / MMA "
             "/ spill loads+stores; in dkdv_own the last loop is the unmasked one that runs "
             "most tiles when SPLIT is on.", "",
             "| kernel | config | switches | regs | spill stack B | loops |",
             "|---|---|---|---|---|---|"]
    for r in result["cases"]:
        sw = ", ".join(f"{k}={v}" for k, v in r["switches"].items()) or "-"
        loops = "; ".join(f"{x['instructions']} / {x['mma']} / {x['spill_ops']}"
                          for x in r["loops"])
        lines.append(f"| {r['kernel']} | {tuple(r['config'])} | {sw} | {r['registers']} | "
                     f"{r['spill_stack_bytes']} | {loops} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--quick", action="store_true", help="one small case (tests)")
    a = p.parse_args(argv)
    # the kernels must be compiled, not interpreted: Triton reads this when they are defined
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run in a fresh process without TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)
    import platform

    import triton
    cases = QUICK if a.quick else CASES
    result = {"environment": {"triton": triton.__version__, "machine": platform.machine(),
                              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                  timespec="seconds")},
              "shape": SHAPE, "cases": []}
    for i, (kernel, config, switches) in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {kernel} {config} {switches}", file=sys.stderr, flush=True)
        result["cases"].append(compile_case(kernel, config, switches))
    # a smoke run never replaces the committed report (a later README refresh would show it)
    stem, md = "sass_sm90", markdown(result)
    if a.quick:
        stem, result["smoke"] = "sass_sm90_quick", True
        md = "Smoke run (--quick: one small case, checks the script). " + md
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(a.out, stem + ".md"), "w") as f:
        f.write(md)
    print(md)
    return result


if __name__ == "__main__":
    main()
