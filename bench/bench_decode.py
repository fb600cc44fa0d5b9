"""CPU decode with prefixes: the cascade kernel vs what PEFT + HF do, on this machine.

Baseline (PEFT prefix tuning in an HF attention layer, one decode step): every row's prefix
is expanded over the batch, concatenated to its own KV cache with torch.cat, then SDPA as
transformers calls it (`prefix_attn.baselines.peft_path_layer`): one query and no
padding, so transformers drops the mask and passes `enable_gqa=True`. transformers builds the
mask and decides to drop it once per forward for all layers, so that part
(`peft_path_forward`) runs once per combo outside the timed call; the timed call is one
layer's: the cache concatenation and SDPA.
Ours: `prefix_attention(..., backend="cpu")`; for Sq <= 16 the C++ kernel takes the cascade
path (one GEMM per bank entry for all rows that use it, split-KV, LSE merge). The per-row
tiled path ("ours rows", PREFIX_ATTN_CPU_PATH=rows) is measured too: it backs the rule.

Grid: B in {1, 8, 64, 256}, P in {128, 2048, 8192}, own KV in {64, 512}; Hq 16, Hkv 4,
D 64, fp32, Sq 1, one bank entry (a shared prefix). Combos whose expanded baseline KV would
exceed --max-baseline-gib are skipped with a note. A second table varies the query heads per
kv head G and Sq at one shape, at one thread (free of the OpenMP waits that other jobs on the
cores cause), to show where the cascade stops paying (kCascadeMaxSq and kCascadeMaxPackedRows
in csrc/cpu/attention_decode.cpp).
Same inputs, same run, variants interleaved in blocks of back-to-back calls, medians;
ratio = baseline / ours.

Writes <out>.json, <out>.md and <out>.png (default bench/results/decode_cpu.*; --quick:
<out>_quick.*, a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prefix_attn import prefix_attention  # noqa: E402
from prefix_attn.baselines import peft_path_forward, peft_path_layer  # noqa: E402
from record import SMOKE_CAPTION, loadavg, smoke_out, versions  # noqa: E402

HQ, HKV, D = 16, 4, 64


def make_inputs(B, Sq, S, P, seed=0, Hq=HQ, Hkv=HKV):
    """q [B, Hq, Sq, D]; k/v [B, Hkv, S, D] (own KV incl. the new tokens); prefix [1, Hkv, P, D]."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(B, Hq, Sq, D), r(B, Hkv, S, D), r(B, Hkv, S, D), r(1, Hkv, P, D), r(1, Hkv, P, D)


def baseline_for(inputs):
    """PEFT + HF, one layer: prefix expanded over the batch, cat to the own KV, SDPA as
    transformers calls it (prefix_attn.baselines, shared with the demo and the GPU bench),
    with the mask decision transformers makes once per forward taken here, before timing."""
    fwd = peft_path_forward(*inputs, causal=True)

    def baseline(q, k, v, pk, pv):
        return peft_path_layer(q, k, v, pk, pv, fwd)
    return baseline


def ours_with(path):
    def run(q, k, v, pk, pv):
        if path is None:
            os.environ.pop("PREFIX_ATTN_CPU_PATH", None)
        else:
            os.environ["PREFIX_ATTN_CPU_PATH"] = path
        try:
            return prefix_attention(q, k, v, pk, pv, causal=True, backend="cpu")
        finally:
            os.environ.pop("PREFIX_ATTN_CPU_PATH", None)
    return run


def path_taken(inputs):
    """Which path the default call took, told by whose output it reproduces bit for bit (the
    two paths sum in different orders)."""
    with torch.no_grad():
        out = {p: ours_with(p)(*inputs) for p in (None, "cascade", "rows")}
    same = [p for p in ("cascade", "rows") if torch.equal(out[None], out[p])]
    return same[0] if len(same) == 1 else "either (equal outputs)"


def median_times(fns, inputs, min_reps, budget_s):
    """Median seconds per call of each variant. Variants alternate within a repetition
    (shared load hits all alike); each takes a block of back-to-back calls lasting ~20 ms, so
    that the first call after a switch (which may wait for the previous variant's spinning
    OpenMP threads) is diluted. At least min_reps repetitions, more while the budget lasts."""
    with torch.no_grad():
        inner = {}
        for name, fn in fns.items():
            fn(*inputs)  # warm-up
            t0 = time.perf_counter()
            fn(*inputs)
            inner[name] = max(1, min(50, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
        ts = {name: [] for name in fns}
        t_start = time.perf_counter()
        while True:
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner[name]):
                    fn(*inputs)
                ts[name].append((time.perf_counter() - t0) / inner[name])
            n = len(ts[next(iter(ts))])
            if n >= min_reps and (time.perf_counter() - t_start > budget_s or n >= 50):
                break
    return {name: statistics.median(v) for name, v in ts.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "decode_cpu"))
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--max-baseline-gib", type=float, default=3.0,
                    help="skip combos whose expanded baseline K+V exceed this")
    ap.add_argument("--budget-s", type=float, default=1.0, help="timing budget per combo")
    ap.add_argument("--threads", default=None,
                    help="comma-separated torch thread counts to run (default: 1 and all)")
    a = ap.parse_args()
    load_before = loadavg()
    # a smoke run never replaces the committed result (a later README refresh would show it)
    a.out = smoke_out(a.out, a.quick)
    if a.quick:
        Bs, Ps, Ss, min_reps, budget = [1, 8], [128], [64], 2, 0.1
        sweep_pairs = [(4, 1), (4, 32), (32, 1)]
    else:
        Bs, Ps, Ss, min_reps = [1, 8, 64, 256], [128, 2048, 8192], [64, 512], 3
        sweep_pairs = [(G, Sq) for G in (4, 16, 32) for Sq in (1, 2, 4, 8, 16)] + [(4, 32), (4, 64)]
        budget = a.budget_s
    ours_variants = {"ours": ours_with(None), "ours_rows": ours_with("rows")}

    all_threads = torch.get_num_threads()
    threads = ([int(x) for x in a.threads.split(",")] if a.threads
               else sorted({1, all_threads}))
    rows, skipped = [], []
    for P, S, B, nt in [(P, S, B, nt) for nt in threads for P in Ps for S in Ss for B in Bs]:
                torch.set_num_threads(nt)
                kv_gib = 2 * B * HKV * (P + S) * D * 4 / 2**30
                if kv_gib > a.max_baseline_gib:
                    skipped.append(dict(B=B, P=P, S=S, threads=nt, reason=f"baseline expanded KV {kv_gib:.1f} "
                                        f"GiB > {a.max_baseline_gib} GiB"))
                    continue
                inputs = make_inputs(B, 1, S, P)
                variants = {"baseline": baseline_for(inputs), **ours_variants}
                with torch.no_grad():
                    err = (variants["baseline"](*inputs) - variants["ours"](*inputs)).abs().max().item()
                assert err < 1e-4, f"B={B} P={P} S={S}: ours differs from baseline by {err}"
                t = median_times(variants, inputs, min_reps, budget)
                rows.append(dict(threads=nt, B=B, P=P, own_kv=S, Sq=1, baseline_ms=t["baseline"] * 1e3,
                                 ours_ms=t["ours"] * 1e3, ours_rows_ms=t["ours_rows"] * 1e3,
                                 speedup=t["baseline"] / t["ours"],
                                 speedup_rows=t["baseline"] / t["ours_rows"], max_abs_diff=err))
                print(f"threads={nt} B={B:4d} P={P:5d} own={S:4d}: baseline {t['baseline']*1e3:9.2f} ms  "
                      f"ours {t['ours']*1e3:8.2f} ms ({rows[-1]['speedup']:6.1f}x)  rows-path "
                      f"{t['ours_rows']*1e3:8.2f} ms", flush=True)
    # G x Sq sweep at one thread: cascade vs per-row tiles at one shape, one kv head (backs
    # kCascadeMaxSq and kCascadeMaxPackedRows), and the path the rule takes
    torch.set_num_threads(1)
    sweep = []
    sB, sP, sS = (8, 128, 64) if a.quick else (8, 2048, 512)
    for G, Sq in sweep_pairs:
        inputs = make_inputs(sB, Sq, sS, sP, Hq=G, Hkv=1)
        fns = {"cascade": ours_with("cascade"), "rows": ours_with("rows")}
        t = median_times(fns, inputs, min_reps, budget)
        auto = path_taken(inputs)
        sweep.append(dict(B=sB, P=sP, own_kv=sS, G=G, Sq=Sq, cascade_ms=t["cascade"] * 1e3,
                          rows_ms=t["rows"] * 1e3, rows_over_cascade=t["rows"] / t["cascade"],
                          auto_path=auto))
        print(f"G={G:2d} Sq={Sq:3d}: cascade {t['cascade']*1e3:.2f} ms, rows {t['rows']*1e3:.2f} ms",
              flush=True)
    torch.set_num_threads(all_threads)

    meta = dict(Hq=HQ, Hkv=HKV, D=D, dtype="float32", threads=threads,
                baseline_mask="built and decided once per forward, outside the timed call",
                load_average_before=load_before, load_average=loadavg(), **versions(),
                cpu=platform.processor() or platform.machine(),
                timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), quick=a.quick)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, sq_sweep=sweep, skipped=skipped), f, indent=2)

    lines = [("" if not a.quick else SMOKE_CAPTION) + f"CPU decode (Sq 1, Hq {HQ}, Hkv {HKV}, D {D}, fp32, one shared prefix): ours "
             f"(cascade) vs PEFT+HF (expand + cat + SDPA as transformers calls it: no padding, "
             f"so no mask and GQA in the kernel; the mask decision taken once per forward, "
             f"outside the timed call), medians, same run, {meta['timestamp'][:10]}, torch "
             f"{meta['torch']}, transformers {meta['transformers']}, load average "
             f"{load_before[0]:.1f} before / {meta['load_average'][0]:.1f} after on "
             f"{os.cpu_count()} cores", "",
             "| threads | B | P | own KV | baseline ms | ours ms | speedup | ours per-row "
             "path ms |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['B']} | {r['P']} | {r['own_kv']} | "
                     f"{r['baseline_ms']:.2f} | {r['ours_ms']:.2f} | {r['speedup']:.1f}x | "
                     f"{r['ours_rows_ms']:.2f} |")
    for s in skipped:
        lines.append(f"| {s['threads']} | {s['B']} | {s['P']} | {s['S']} | skipped: "
                     f"{s['reason']} | | | |")
    lines += ["", f"Path rule (1 thread, B {sB}, P {sP} shared, own KV {sS}, Hkv 1, G query heads "
              "per kv head): cascade vs per-row tiles by G and Sq, and the path the rule takes",
              "", "| G | Sq | G x Sq | cascade ms | per-row ms | per-row / cascade | rule took |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in sweep:
        lines.append(f"| {s['G']} | {s['Sq']} | {s['G'] * s['Sq']} | {s['cascade_ms']:.2f} | "
                     f"{s['rows_ms']:.2f} | {s['rows_over_cascade']:.2f} | {s['auto_path']} |")
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.5), squeeze=False)
    for ax, nt in zip(axes[0], threads):
        for P in Ps:
            for S, style in zip(Ss, ["-o", "--s"]):
                pts = [(r["B"], r["speedup"]) for r in rows
                       if r["P"] == P and r["own_kv"] == S and r["threads"] == nt]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"P {P}, own KV {S}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("speedup vs expand + cat + SDPA")
        ax.set_title(f"CPU decode, Sq 1, Hq {HQ}/Hkv {HKV}, D {D}, fp32, {nt} thread(s)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
