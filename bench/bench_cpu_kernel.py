"""CPU kernel vs what HF + PEFT do for prefix tuning, on this machine.

Baseline (PEFT's prefix tuning inside an HF attention layer): the prefix is expanded over the
batch, concatenated to the own KV, an explicit bool mask [B, 1, Sq, P + Skv] is built, then
SDPA is called as transformers calls it with a mask: K/V repeated over the query heads of
each kv head first (`prefix_attn.baselines.peft_path_layer`). transformers builds the mask
(and decides to keep it) once per forward for all layers: that part (`peft_path_forward`)
runs once per input set, outside the timed call, which is one layer's work (cat, repeat_kv,
SDPA with the mask); the older baseline's mask likewise.
Ours: `prefix_attention(..., backend="cpu")` reading one copy of the prefix.

Same inputs, same run; medians of repeated timings; ratio = baseline / ours (> 1: we are
faster). Peak memory: each (variant, mode) runs in a fresh subprocess: one warm-up call, then
the peak RSS is reset (/proc/self/clear_refs) and the extra peak of a second call is VmHWM
after it minus VmRSS before it (inputs already built): every temporary of the call counts,
one-time costs (imports, thread pools, BLAS buffers) do not.

Writes bench/results/cpu_kernel.json and bench/results/cpu_kernel.md (--quick: a smoke run,
cpu_kernel_quick.*; another --shape: cpu_kernel_shape_<dims>.*).
Usage: python bench/bench_cpu_kernel.py [--reps 10] [--shape B,Hq,Hkv,D,S,P] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prefix_attn import prefix_attention  # noqa: E402
from prefix_attn.baselines import (older_baseline_mask,  # noqa: E402
                                   peft_path_attention_enable_gqa, peft_path_forward,
                                   peft_path_layer)
from record import SMOKE_CAPTION, smoke_out, versions  # noqa: E402

DEFAULT_SHAPE = dict(B=4, Hq=16, Hkv=4, D=64, S=512, P=64)
QUICK_SHAPE = dict(B=2, Hq=4, Hkv=2, D=32, S=128, P=16)


def make_inputs(B, Hq, Hkv, D, S, P, requires_grad, seed=0):
    """q [B, Hq, S, D], k/v [B, Hkv, S, D], one prefix [1, Hkv, P, D] (fp32)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)  # noqa: E731
    return r(B, Hq, S, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(1, Hkv, P, D), r(1, Hkv, P, D)


def baseline_for(inputs):
    """PEFT + HF, one layer: prefix expanded over the batch, cat to the own KV, SDPA as
    transformers calls it with the explicit mask (prefix_attn.baselines, shared with the demo
    and the GPU bench); the mask is built once per forward, here, before timing."""
    fwd = peft_path_forward(*inputs, causal=True)

    def baseline(q, k, v, pk, pv):
        return peft_path_layer(q, k, v, pk, pv, fwd)
    return baseline


def ours(q, k, v, pk, pv):
    return prefix_attention(q, k, v, pk, pv, causal=True, backend="cpu")


def older_baseline_for(inputs):
    """The baseline of the runs before 2026-11-28: `enable_gqa=True` with the mask (timed only,
    to show what the change of baseline did); its mask too built once, before timing."""
    mask = older_baseline_mask(*inputs, causal=True)

    def older_baseline(q, k, v, pk, pv):
        return peft_path_attention_enable_gqa(q, k, v, pk, pv, causal=True, mask=mask)
    return older_baseline


def variants_for(inputs) -> dict:
    return {"baseline": baseline_for(inputs), "ours": ours,
            "older_baseline": older_baseline_for(inputs)}


def run_once(fn, inputs, mode):
    if mode == "fwd":
        with torch.no_grad():
            fn(*inputs)
    else:
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        del grads


def median_times(fns, inputs, mode, reps):
    """Median seconds per variant; the variants alternate within each repetition so that
    load from other processes on the machine hits both alike."""
    ts = {name: [] for name in fns}
    for name, fn in fns.items():
        run_once(fn, inputs, mode)  # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            run_once(fn, inputs, mode)
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant, mode, shape):
    """Runs in a fresh process: extra peak bytes of one call (printed as JSON)."""
    inputs = make_inputs(**shape, requires_grad=(mode == "fwdbwd"))
    # warm-up call: lazy imports, thread pools and BLAS buffers are one-time costs
    fn = variants_for(inputs)[variant]
    run_once(fn, inputs, mode)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    run_once(fn, inputs, mode)
    print(json.dumps({"extra_peak_bytes": _status_bytes("VmHWM") - before}))


def measure_memory(variant, mode, shape):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", variant, mode,
           "--shape", ",".join(str(shape[k]) for k in "B Hq Hkv D S P".split())]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["extra_peak_bytes"]


def parse_shape(s):
    vals = [int(x) for x in s.split(",")]
    return dict(zip("B Hq Hkv D S P".split(), vals))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--shape", default=None, help="B,Hq,Hkv,D,S,P (another shape than the "
                    "default writes <out>_shape_B-Hq-Hkv-D-S-P: not the README's table)")
    ap.add_argument("--quick", action="store_true",
                    help=f"shape {QUICK_SHAPE}, 2 reps: a smoke run, written to <out>_quick")
    ap.add_argument("--memory-child", nargs=2, default=None)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_kernel"))
    a = ap.parse_args()
    shape = parse_shape(a.shape) if a.shape else QUICK_SHAPE if a.quick else DEFAULT_SHAPE
    if a.memory_child:
        memory_child(*a.memory_child, shape)
        return
    # only the default shape and reps replace the result the README shows
    if a.quick:
        a.reps = 2 if a.reps == ap.get_default("reps") else a.reps
        a.out = smoke_out(a.out, True)
    elif shape != DEFAULT_SHAPE:
        a.out += "_shape_" + "-".join(str(shape[k]) for k in "B Hq Hkv D S P".split())

    load_before = os.getloadavg()
    # correctness first: the two must agree
    inputs = make_inputs(**shape, requires_grad=False)
    with torch.no_grad():
        err = (baseline_for(inputs)(*inputs) - ours(*inputs)).abs().max().item()
    assert err < 1e-4, f"ours differs from the baseline by {err}"

    rows = []
    for mode in ("fwd", "fwdbwd"):
        inputs = make_inputs(**shape, requires_grad=(mode == "fwdbwd"))
        t = median_times(variants_for(inputs), inputs, mode, a.reps)
        mem = {name: measure_memory(name, mode, shape) for name in ("baseline", "ours")}
        rows.append(dict(mode=mode, baseline_ms=t["baseline"] * 1e3, ours_ms=t["ours"] * 1e3,
                         speedup=t["baseline"] / t["ours"],
                         older_baseline_ms=t["older_baseline"] * 1e3,
                         older_speedup=t["older_baseline"] / t["ours"],
                         baseline_peak_mib=mem["baseline"] / 2**20,
                         ours_peak_mib=mem["ours"] / 2**20,
                         memory_ratio=mem["baseline"] / max(mem["ours"], 1)))
    load_after = os.getloadavg()
    meta = dict(shape=shape, dtype="float32", causal=True, reps=a.reps, quick=a.quick,
                baseline_mask="built once per forward, outside the timed call",
                threads=torch.get_num_threads(), **versions(),
                cpu=platform.processor() or platform.machine(),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                max_abs_diff_vs_baseline=err,
                # 1/5/15-minute load averages: the cores are shared, figures taken under
                # load (1-minute value >= 2 on 2 cores) do not describe a quiet machine
                loadavg_before=list(load_before), loadavg_after=list(load_after),
                memory_method="extra peak RSS of the second call in a fresh process "
                              "(VmHWM after - VmRSS before, peak reset by clear_refs)")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    lines = [("" if not a.quick else SMOKE_CAPTION) + f"CPU kernel vs HF+PEFT (expand + cat + repeat_kv + SDPA with the mask, as "
             f"transformers; the mask built once per forward, outside the timed call), "
             f"shape {shape}, fp32, causal, {meta['threads']} threads, {meta['timestamp'][:10]}, "
             f"torch {meta['torch']}, transformers {meta['transformers']}, medians of {a.reps}, "
             f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after",
             "", "| mode | baseline ms | ours ms | speedup | baseline peak MiB | ours peak MiB "
             "| older baseline (enable_gqa + mask) ms | speedup over it |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['baseline_ms']:.2f} | {r['ours_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['baseline_peak_mib']:.1f} | "
                     f"{r['ours_peak_mib']:.1f} | {r['older_baseline_ms']:.2f} | "
                     f"{r['older_speedup']:.2f}x |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
