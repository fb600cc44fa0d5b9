"""GPU benchmark of the triton backend: TFLOP/s forward and backward against
`F.scaled_dot_product_attention` (flash backend) on the same total KV length, and end to
end (forward + backward) against the PEFT path (prefix copied over the batch, concatenated,
explicit bool mask, SDPA: `prefix_attn.baselines.peft_path_attention`).

Usage (on a CUDA machine, package installed):
    python bench/bench_triton_gpu.py --out OUTDIR            # H200 targets: bf16, D 128, S 4096
    python bench/bench_triton_gpu.py --out OUTDIR --dry-run  # CPU, tiny sizes, no GPU needed

Writes OUTDIR/bench_triton_gpu.json: GPU name, torch/triton versions, date, the shapes, one
record per (P, mode) with milliseconds, TFLOP/s and ratios, and the targets with a
met/missed flag. --dry-run runs the same code path on CPU with the `torch` backend and
wall-clock timing (numbers meaningless; it checks parsing, FLOP counting and the JSON).

FLOPs (flash-attention convention, 2 per multiply-add, two matmuls forward, 2.5x that
backward) count only visible (query, key) pairs: for a causal row of S queries over P
prefix keys and S own keys that is S * P + S * (S + 1) / 2 pairs per head. The SDPA-flash
baseline runs causal attention on a sequence of the same total length S + P, i.e.
(S + P) * (S + P + 1) / 2 pairs per head.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

TARGETS = {  # H200, bf16, D 128, S 4096, P 128
    "fwd_tflops_min": 400.0,
    "fwd_vs_sdpa_flash_min": 1.0,
    "e2e_vs_peft_min": 2.0,
    "bwd_tflops_min": 250.0,
}
TARGET_P = 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for bench_triton_gpu.json (and .md)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=4096, help="own tokens per row (Sq = Skv = S)")
    p.add_argument("--prefix", default="16,64,128,256", help="comma-separated prefix lengths P")
    p.add_argument("--modes", default="fwd,bwd,e2e,decode,ablate,profile,sweep",
                   help="subset of fwd,bwd,e2e,decode,ablate,profile,sweep (ablate: the backward "
                        "with each kernel switch of ABLATIONS flipped and at its default, at P "
                        "128; profile: kernel time breakdown of one forward + backward of ours "
                        "and of the baselines at P 128; "
                        "sweep: cascade vs per-row decode over a grid of batch / prefix / own-KV "
                        "lengths, and the automatic choice)")
    p.add_argument("--decode-batch", type=int, default=64,
                   help="rows of the decode measurement (Sq = 1 over S own keys, one shared prefix)")
    p.add_argument("--reps", type=int, default=20,
                   help="timed repetitions per measurement, at least (GPU: do_bench runs as many "
                        "as fit in max(--rep-ms, reps x one call's time))")
    p.add_argument("--rep-ms", type=float, default=250.0,
                   help="GPU: milliseconds of timed calls per measurement (do_bench's rep)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, torch backend: checks the script, not the GPU")
    p.add_argument("--render", metavar="JSON",
                   help="only write the Markdown table of an existing result JSON, next to it")
    a = p.parse_args(argv)
    if not a.out and not a.render:
        p.error("--out is required (unless --render)")
    a.prefix_lens = [int(x) for x in a.prefix.split(",") if x.strip()]
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = set(a.mode_list) - {"fwd", "bwd", "e2e", "decode", "ablate", "profile", "sweep"}
    if bad:
        p.error(f"unknown modes {sorted(bad)}")
    if a.hq % a.hkv:
        p.error(f"--hq {a.hq} must be a multiple of --hkv {a.hkv}")
    if a.dry_run:
        a.batch, a.hq, a.hkv, a.head_dim, a.seq, a.decode_batch = 2, 4, 2, 16, 32, 3
        a.prefix_lens = sorted({min(P, 8) for P in a.prefix_lens}) or [8]
        a.reps = 2
        a.dtype = "fp32"
    return a


def causal_pairs(S: int, P: int) -> int:
    """Visible (query, key) pairs per head: S queries, P prefix keys, S causal own keys."""
    return S * P + S * (S + 1) // 2


def attn_flops(B: int, H: int, D: int, pairs: int, mode: str) -> float:
    """FLOPs of attention over `pairs` visible pairs per head: fwd 4*D per pair, bwd 2.5x."""
    fwd = 4.0 * B * H * D * pairs
    return {"fwd": fwd, "decode": fwd, "bwd": 2.5 * fwd, "e2e": 3.5 * fwd}[mode]


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12 if ms > 0 else float("nan")


def timer(device: str, reps: int, rep_ms: float = 250.0):
    """A function timing fn() in milliseconds (median): CUDA events on GPU, wall clock on CPU.

    On GPU, triton.testing.do_bench (L2 flushed before each call) with `rep` milliseconds of
    calls, raised so that at least `reps` calls are timed (do_bench's `rep` is a time, not a
    count: 50 ms gave a 13 ms step only 3 samples)."""
    if device == "cuda":
        import triton.testing

        def gpu_time(fn):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            one_ms = (time.perf_counter() - t) * 1e3
            return triton.testing.do_bench(fn, warmup=max(25, 2 * one_ms),
                                           rep=max(rep_ms, reps * one_ms), return_mode="median")
        return gpu_time

    def cpu_time(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return sorted(ts)[len(ts) // 2]
    return cpu_time


def peft_attention(q, k, v, pk, pv):
    """The PEFT path (prefix_attn.baselines, shared with the demo and the other benchmarks):
    prefix [Hkv, P, D] copied per row, concatenated to the own KV, explicit bool mask
    [B, 1, S, P + S], SDPA."""
    from prefix_attn.baselines import peft_path_attention

    return peft_path_attention(q, k, v, pk, pv)


def _peft_layer(q, k, v, pk, pv):
    """One layer of the PEFT path as transformers runs it in a forward: the dense mask (and
    the decision to keep it) made here, once, as per forward for all layers; the returned call
    does the per-layer work (the cache cat, the GQA repeat, SDPA with that mask)."""
    from prefix_attn.baselines import peft_path_forward, peft_path_layer

    fwd = peft_path_forward(q, k, v, pk, pv)
    return lambda: peft_path_layer(q, k, v, pk, pv, fwd)


def kernel_breakdown(fn, device: str, top: int = 8) -> dict:
    """Where one call of fn() spends its time: torch.profiler over one call after a warm-up,
    device time per kernel name (CUDA) or self CPU time per op (CPU), the `top` largest."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = (e.self_device_time_total or e.device_time_total) if cuda else e.self_cpu_time_total
        if us > 0:
            rows.append({"kernel": e.key, "ms": us / 1e3, "calls": e.count})
    rows.sort(key=lambda r: -r["ms"])
    return {"total_ms": sum(r["ms"] for r in rows), "top": rows[:top]}


def reference_P(a) -> int:
    """The prefix length of the one-off measurements (ablations, breakdown, old baseline)."""
    return TARGET_P if TARGET_P in a.prefix_lens else a.prefix_lens[0]


def sdpa_flash(q, k, v):
    """Causal SDPA restricted to the flash backend (GQA through enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def sdpa_any(q, k, v):
    """Dry-run stand-in for sdpa_flash: CPU has no flash backend."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def environment(device: str) -> dict:
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
    }


def _train_inputs(a, P: int, device: str, g):
    """q, k, v [B, H, S, D] and one prefix pk, pv [Hkv, P, D], all requiring grad."""
    dtype = DTYPES[a.dtype]
    B, Hq, Hkv, D, S = a.batch, a.hq, a.hkv, a.head_dim, a.seq

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

    return rnd(B, Hq, S, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(Hkv, P, D), rnd(Hkv, P, D)


def bench_one(a, P: int, device: str, time_ms) -> list:
    from prefix_attn import prefix_attention

    dtype = DTYPES[a.dtype]
    B, Hq, Hkv, D, S = a.batch, a.hq, a.hkv, a.head_dim, a.seq
    backend = "torch" if a.dry_run else "triton"
    sdpa = sdpa_any if a.dry_run else sdpa_flash
    g = torch.Generator(device=device).manual_seed(P)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

    q, k, v, pk, pv = _train_inputs(a, P, device, g)
    # the flash baseline: one causal sequence of the same total length S + P
    fq, fk, fv = rnd(B, Hq, S + P, D), rnd(B, Hkv, S + P, D), rnd(B, Hkv, S + P, D)
    ours_pairs, flash_pairs = causal_pairs(S, P), causal_pairs(S + P, 0)

    def ours():
        return prefix_attention(q, k, v, pk, pv, backend=backend)

    records = []
    if "fwd" in a.mode_list or "bwd" in a.mode_list:
        with torch.no_grad():
            t_ours, t_flash = time_ms(ours), time_ms(lambda: sdpa(fq, fk, fv))
        records.append(_record("fwd", P, t_ours, t_flash, "sdpa_flash", B, Hq, D,
                               ours_pairs, flash_pairs))
    if "bwd" in a.mode_list:
        o, of = ours(), sdpa(fq, fk, fv)
        do, dof = torch.randn_like(o), torch.randn_like(of)
        # backward alone: keep the graph, time only the gradient computation
        t_ours = time_ms(lambda: torch.autograd.grad(o, (q, k, v, pk, pv), do, retain_graph=True))
        t_flash = time_ms(lambda: torch.autograd.grad(of, (fq, fk, fv), dof, retain_graph=True))
        records.append(_record("bwd", P, t_ours, t_flash, "sdpa_flash", B, Hq, D,
                               ours_pairs, flash_pairs))
    if "e2e" in a.mode_list:
        do = torch.randn(B, Hq, S, D, generator=g, device=device, dtype=dtype)

        def step(fn):
            return lambda: torch.autograd.grad(fn(), (q, k, v, pk, pv), do)

        t_ours = time_ms(step(ours))
        peft_layer = _peft_layer(q, k, v, pk, pv)  # the mask built once, as per forward
        t_peft = _baseline_ms(time_ms, step(peft_layer), "PEFT path")
        records.append(_record("e2e", P, t_ours, t_peft, "peft_transformers", B, Hq, D,
                               ours_pairs, ours_pairs))
        if P == reference_P(a):
            # the baseline of the first H200 run: enable_gqa with the mask (built once too)
            from prefix_attn.baselines import older_baseline_mask
            from prefix_attn.baselines import peft_path_attention_enable_gqa as older

            mask = older_baseline_mask(q, k, v, pk, pv, causal=True)
            t_old = _baseline_ms(time_ms, step(lambda: older(q, k, v, pk, pv, mask=mask)),
                                 "older PEFT path")
            records.append(_record("e2e", P, t_ours, t_old, "peft_sdpa", B, Hq, D,
                                   ours_pairs, ours_pairs))
    if "decode" in a.mode_list:
        records += bench_decode(a, P, device, time_ms, backend)
    return records


def _baseline_ms(time_ms, fn, what: str) -> float:
    """time_ms(fn), or NaN (with the error printed) when a baseline fails, e.g. runs out of
    memory: the rest of the run goes on; the record shows nan and its target reads not met."""
    try:
        return time_ms(fn)
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        print(f"{what} failed: {e!r}"[:500], flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return float("nan")


def bench_decode(a, P: int, device: str, time_ms, backend: str) -> list:
    """One new token per row (Sq = 1) over S cached own keys, all rows sharing one prefix:
    the cascade path (PREFIX_ATTN_TRITON_CASCADE=1) against the per-row kernel (=0) and the
    PEFT path, one layer's part of it (the mask decision is made once per forward, before
    timing). Forward only, no grad."""
    from prefix_attn import prefix_attention

    dtype = DTYPES[a.dtype]
    B, Hq, Hkv, D, S = a.decode_batch, a.hq, a.hkv, a.head_dim, a.seq
    g = torch.Generator(device=device).manual_seed(1000 + P)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    q, k, v = rnd(B, Hq, 1, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D)
    pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
    pairs = P + S
    times = _time_cascade_modes(time_ms, lambda: prefix_attention(q, k, v, pk, pv, backend=backend))
    from prefix_attn.baselines import peft_path_forward, peft_path_layer

    with torch.no_grad():
        # transformers builds the mask and drops it once per forward, for all layers: not timed
        fwd = peft_path_forward(q, k, v, pk, pv)
        t_peft = _baseline_ms(time_ms, lambda: peft_path_layer(q, k, v, pk, pv, fwd), "PEFT path")
    return [_record("decode", P, times["1"], times["0"], "per_row_kernel", B, Hq, D, pairs, pairs),
            _record("decode", P, times["1"], t_peft, "peft_transformers", B, Hq, D, pairs, pairs)]


def _time_cascade_modes(time_ms, call) -> dict:
    """{"1": ms with the cascade forced, "0": ms with the per-row kernel forced} of call(),
    without grad; $PREFIX_ATTN_TRITON_CASCADE is restored afterwards."""
    env = "PREFIX_ATTN_TRITON_CASCADE"
    prev, times = os.environ.get(env), {}
    try:
        with torch.no_grad():
            for mode in ("1", "0"):
                os.environ[env] = mode
                times[mode] = time_ms(call)
    finally:
        if prev is None:
            os.environ.pop(env, None)
        else:
            os.environ[env] = prev
    return times


# Kernel switches compared in the same run: (module, attribute). Each is a change made on a
# CPU-only machine (judged there by its sm_90 SASS, bench/sass_report.py) that only a GPU can
# time; both settings run at the configs autotuned for the default one.
ABLATIONS = {
    "dkdv_split_masked_tiles": ("prefix_attn.kernels.bwd", "SPLIT_MASKED_TILES"),
    "hoist_query_offsets": ("prefix_attn.kernels.bwd", "HOIST_QUERY_OFFSETS"),
}


def bench_ablations(a, device: str, time_ms) -> list:
    """Backward time with each ABLATIONS switch flipped, then at its default, at P = TARGET_P
    (or the first P), after the main measurements (so the autotuner's choice for the default
    is cached and reused). The switches are Triton kernel flags: a dry run exercises them
    through the interpreter (TRITON_INTERPRET=1), else skips."""
    import importlib

    from prefix_attn import prefix_attention
    from prefix_attn.kernels.autotune import interpreting

    if a.dry_run and not interpreting():
        return []
    P = reference_P(a)
    q, k, v, pk, pv = _train_inputs(a, P, device, torch.Generator(device=device).manual_seed(P))
    out = prefix_attention(q, k, v, pk, pv, backend="triton")
    do = torch.randn_like(out)
    results = []
    for name, (mod_name, attr) in ABLATIONS.items():
        mod = importlib.import_module(mod_name)
        default, times = getattr(mod, attr), {}
        try:
            for setting in (not default, default):
                setattr(mod, attr, setting)
                times[setting] = time_ms(lambda: torch.autograd.grad(
                    out, (q, k, v, pk, pv), do, retain_graph=True))
        finally:
            setattr(mod, attr, default)
        results.append({"switch": name, "P": P, "default": default,
                        "default_ms": times[default], "other_ms": times[not default],
                        "speedup_of_default": times[not default] / times[default]})
        print(f"ablate {name} P={P}: default ({default}) {times[default]:.3f} ms, "
              f"other {times[not default]:.3f} ms", flush=True)
    return results


# (B, P, Skv) of the decode sweep: one shared prefix entry, Sq 1
SWEEP = [(64, 128, 4096), (64, 2048, 512), (64, 8192, 64), (256, 2048, 256), (8, 2048, 512),
         (1, 2048, 4096), (1, 0, 32768), (4, 0, 8192)]
DRY_SWEEP = [(3, 8, 32), (1, 0, 64)]


def bench_decode_sweep(a, device: str, time_ms, backend: str) -> list:
    """Cascade against per-row kernel over SWEEP, with the path `use_cascade` picks: the data
    the automatic rule (kernels/decode.py) is checked against."""
    from prefix_attn import prefix_attention
    from prefix_attn.kernels.autotune import sm_count
    from prefix_attn.kernels.decode import use_cascade

    dtype = DTYPES[a.dtype]
    Hq, Hkv, D = a.hq, a.hkv, a.head_dim
    sms = sm_count(torch.device(device))
    g = torch.Generator(device=device).manual_seed(7)
    out = []
    for B, P, Skv in (DRY_SWEEP if a.dry_run else SWEEP):
        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype)

        q, k, v = rnd(B, Hq, 1, D), rnd(B, Hkv, Skv, D), rnd(B, Hkv, Skv, D)
        pk, pv = rnd(Hkv, P, D), rnd(Hkv, P, D)
        t = _time_cascade_modes(time_ms, lambda: prefix_attention(q, k, v, pk, pv, backend=backend))
        auto = use_cascade(B, 1, P, 1, Skv, Hkv=Hkv, sms=sms, G=Hq // Hkv)
        out.append({"B": B, "P": P, "Skv": Skv, "cascade_ms": t["1"], "per_row_ms": t["0"],
                    "auto": "cascade" if auto else "per_row",
                    "auto_is_faster": bool((t["1"] <= t["0"]) == auto)})
        print(f"sweep B={B} P={P} Skv={Skv}: cascade {t['1']:.3f} ms, per-row {t['0']:.3f} ms, "
              f"auto picks {out[-1]['auto']}", flush=True)
        del q, k, v, pk, pv
    return out


def bench_profile(a, device: str) -> dict:
    """Kernel time breakdown of one forward + backward at reference_P(a): ours, the PEFT path
    and the enable_gqa variant (which SDPA backend each baseline really runs, and where our
    backward's time goes: Delta, dK/dV own, dK/dV prefix, dQ)."""
    from prefix_attn import prefix_attention
    from prefix_attn.baselines import older_baseline_mask, peft_path_attention_enable_gqa

    P = reference_P(a)
    q, k, v, pk, pv = _train_inputs(a, P, device, torch.Generator(device=device).manual_seed(P))
    do = torch.randn(a.batch, a.hq, a.seq, a.head_dim, device=device, dtype=DTYPES[a.dtype])
    backend = "torch" if a.dry_run else "triton"
    mask = older_baseline_mask(q, k, v, pk, pv, causal=True)  # once, as per forward
    variants = {"ours": lambda: prefix_attention(q, k, v, pk, pv, backend=backend),
                "peft_transformers": _peft_layer(q, k, v, pk, pv),
                "peft_sdpa": lambda: peft_path_attention_enable_gqa(q, k, v, pk, pv, mask=mask)}
    out = {"P": P}
    for name, fn in variants.items():
        out[name] = kernel_breakdown(lambda: torch.autograd.grad(fn(), (q, k, v, pk, pv), do),
                                     device)
        top = out[name]["top"][0] if out[name]["top"] else {"kernel": "-", "ms": 0.0}
        print(f"profile {name} P={P}: {out[name]['total_ms']:.3f} ms in kernels, largest "
              f"{top['kernel'][:60]} {top['ms']:.3f} ms", flush=True)
    return out


def _record(mode, P, t_ours, t_base, base_name, B, Hq, D, ours_pairs, base_pairs):
    f_ours, f_base = attn_flops(B, Hq, D, ours_pairs, mode), attn_flops(B, Hq, D, base_pairs, mode)
    r = {"mode": mode, "P": P, "baseline": base_name,
         "ours_ms": t_ours, "baseline_ms": t_base,
         "ours_tflops": tflops(f_ours, t_ours), "baseline_tflops": tflops(f_base, t_base)}
    # throughput ratio (each side counted on its own visible pairs); > 1 means ours is faster
    r["tflops_ratio"] = r["ours_tflops"] / r["baseline_tflops"] if r["baseline_tflops"] else float("nan")
    r["time_ratio"] = t_base / t_ours if t_ours > 0 else float("nan")
    return r


def check_targets(records) -> dict:
    """Each target of TARGETS against the record at P = TARGET_P (None when not measured)."""
    by = {(r["mode"], r["P"], r.get("baseline")): r for r in records}
    fwd = by.get(("fwd", TARGET_P, "sdpa_flash"))
    bwd = by.get(("bwd", TARGET_P, "sdpa_flash"))
    e2e = by.get(("e2e", TARGET_P, "peft_transformers"))
    got = {
        "fwd_tflops_min": fwd and fwd["ours_tflops"],
        "fwd_vs_sdpa_flash_min": fwd and fwd["tflops_ratio"],
        "e2e_vs_peft_min": e2e and e2e["time_ratio"],
        "bwd_tflops_min": bwd and bwd["ours_tflops"],
    }
    return {name: {"target": TARGETS[name], "measured": got[name],
                   "met": None if got[name] is None else bool(got[name] >= TARGETS[name])}
            for name in TARGETS}


def autotuned_configs() -> dict:
    """The config each autotuned kernel settled on, per autotune key (empty off GPU)."""
    try:
        from prefix_attn.kernels import bwd, fwd
    except ImportError:
        return {}
    out = {}
    for name, k in (("fwd", fwd._attn_fwd), ("dkdv_own", bwd._bwd_dkdv_own),
                    ("dkdv_prefix", bwd._bwd_dkdv_prefix), ("dq", bwd._bwd_dq)):
        cache = getattr(k, "cache", None) or {}
        out[name] = {str(key): str(cfg) for key, cfg in cache.items()}
    return out


_MODE_TEXT = {"fwd": "forward", "bwd": "backward", "e2e": "fwd+bwd", "decode": "decode (cascade)"}
_BASE_TEXT = {"sdpa_flash": "SDPA flash, same total length",
              # the first baseline (runs up to 2026-11-28): enable_gqa with the mask
              "peft_sdpa": "PEFT path, older form (SDPA enable_gqa + mask)",
              "peft_transformers": "PEFT path as transformers runs it",
              "per_row_kernel": "our per-row kernel"}


def _decode_batch(result: dict) -> int:
    """The decode rows' batch: recorded in the shape since it was added there; older results
    ran with the --decode-batch given in their argv, else its default, 64 since decode rows exist."""
    if "decode_B" in result["shape"]:
        return result["shape"]["decode_B"]
    argv = result["environment"].get("argv") or []
    for i, arg in enumerate(argv[:-1]):
        if arg == "--decode-batch":
            return int(argv[i + 1])
    return 64


def _timing_note(result: dict) -> str:
    """How many calls stand behind each figure. Runs since commit adad051 record their timing
    rule; a result without one was timed by the rule before it, do_bench(fn, warmup=25,
    rep=50) with rep in milliseconds: do_bench times max(1, int(50 / estimated ms)) calls, so
    a figure of t ms is the median of about that many calls (one for a 26 ms call)."""
    if result.get("timing"):
        return f"Timing: {result['timing']}."
    counts = {}
    for r in result["records"]:
        for side in ("ours", "baseline"):
            ms = r[f"{side}_ms"]
            if ms == ms and ms > 0:
                n = max(1, int(50 / ms))
                key = (r["mode"], side)
                counts[key] = min(n, counts.get(key, n))
    parts = [f"{_MODE_TEXT[m]} {side} {n}" for (m, side), n in
             sorted(counts.items(), key=lambda kv: (list(_MODE_TEXT).index(kv[0][0]), kv[0][1] != "ours"))]
    return ("Timing not recorded in this result: it was timed before commit adad051 fixed the "
            "timer, by triton.testing.do_bench(fn, warmup=25, rep=50), rep in milliseconds, so "
            "each figure is the median of only max(1, int(50 / ms)) timed calls; fewest per "
            "figure: " + ", ".join(parts) + ".")


def _decode_mask_note(result: dict) -> str:
    """Results from before `decode_baseline_mask` was recorded timed the PEFT path's decode
    with the dense mask built and read back (to drop it) inside every call."""
    if result.get("decode_baseline_mask") or not any(r["mode"] == "decode" for r in result["records"]):
        return ""
    return (" The decode rows' PEFT-path baseline built the dense mask and read it back inside "
            "every timed call, work transformers does once per forward for all layers: that "
            "overstates our ratio over it, most at small batch.")


def _e2e_mask_note(result: dict) -> str:
    """Results from before `e2e_baseline_mask` was recorded timed the fwd+bwd baselines with
    the dense mask built (and read back) inside every call."""
    if result.get("e2e_baseline_mask") or not any(r["mode"] == "e2e" for r in result["records"]):
        return ""
    return (" The fwd+bwd rows' baselines built their dense mask inside every timed call too "
            "(a small share of a call at these sizes, not measured apart).")


def markdown(result: dict) -> str:
    """The README table of a result: one line per record, then the targets."""
    env, sh = result["environment"], result["shape"]
    lines = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"{env['date'][:10]}; {sh['dtype']}, B {sh['B']}, Hq {sh['Hq']}, Hkv {sh['Hkv']}, "
             f"D {sh['D']}, S {sh['S']}, causal; decode rows: B {_decode_batch(result)}, Sq 1 over "
             f"S own keys, one shared prefix. TFLOP/s count visible (query, key) pairs only; "
             f"ratio = baseline time / ours. {_timing_note(result)}{_decode_mask_note(result)}"
             f"{_e2e_mask_note(result)}",
             "", "| P | pass | ours ms | ours TFLOP/s | baseline | baseline ms | baseline TFLOP/s | ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["records"], key=lambda r: (r["P"], list(_MODE_TEXT).index(r["mode"]))):
        lines.append(f"| {r['P']} | {_MODE_TEXT[r['mode']]} | {r['ours_ms']:.3f} | {r['ours_tflops']:.0f} | "
                     f"{_BASE_TEXT.get(r['baseline'], r['baseline'])} | {r['baseline_ms']:.3f} | "
                     f"{r['baseline_tflops']:.0f} | {r['time_ratio']:.2f}x |")
    if result.get("decode_sweep"):
        lines += ["", "Decode path choice (Sq 1, one shared entry; ratio = per-row / cascade time):", "",
                  "| B | P | own keys | cascade ms | per-row ms | ratio | automatic choice |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["decode_sweep"]:
            mark = "" if r["auto_is_faster"] else " (slower one)"
            lines.append(f"| {r['B']} | {r['P']} | {r['Skv']} | {r['cascade_ms']:.3f} | "
                         f"{r['per_row_ms']:.3f} | {r['per_row_ms'] / r['cascade_ms']:.2f}x | "
                         f"{r['auto']}{mark} |")
    if result.get("ablations"):
        lines += ["", "Kernel switches (backward alone, at the configs tuned for the default; "
                  "ratio = other setting's time / default's):", "",
                  "| switch | P | default | default ms | other ms | ratio |", "|---|---|---|---|---|---|"]
        for r in result["ablations"]:
            lines.append(f"| `{r['switch']}` | {r['P']} | {r['default']} | {r['default_ms']:.3f} | "
                         f"{r['other_ms']:.3f} | {r['speedup_of_default']:.3f}x |")
    if result.get("profile"):
        prof = result["profile"]
        lines += ["", f"Kernel time of one forward + backward at P {prof['P']} (torch.profiler; "
                  "the largest kernels of each):", "",
                  "| variant | kernels ms | kernel | ms | calls |", "|---|---|---|---|---|"]
        for name in ("ours", "peft_transformers", "peft_sdpa"):
            for i, r in enumerate(prof.get(name, {}).get("top", [])[:6]):
                head = f"{name} | {prof[name]['total_ms']:.3f}" if i == 0 else " | "
                kernel = r["kernel"] if len(r["kernel"]) <= 70 else r["kernel"][:67] + "..."
                lines.append(f"| {head} | `{kernel}` | {r['ms']:.3f} | {r['calls']} |")
    failed = {k: v for k, v in result.items() if k.endswith("_error")}
    if failed:
        lines += ["", "Parts that failed in this run (their exception; the rest was measured):", ""]
        lines += [f"- `{k[:-len('_error')]}`: `{v}`" for k, v in sorted(failed.items())]
    lines += ["", f"Targets at P {TARGET_P}:", ""]
    for name, t in result.get("targets", {}).items():
        got = "not measured" if t["measured"] is None else f"{t['measured']:.2f}"
        verdict = {True: "met", False: "**not met**", None: "-"}[t["met"]]
        lines.append(f"- `{name}` >= {t['target']}: {got} ({verdict})")
    return "\n".join(lines) + "\n"


def _write(result: dict, out: str) -> None:
    """bench_triton_gpu.json and .md in out (rewritten after each stage of the run)."""
    with open(os.path.join(out, "bench_triton_gpu.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "bench_triton_gpu.md"), "w") as f:
        f.write(markdown(result))


def _guarded(result: dict, part: str, run) -> None:
    """result[part] = run(), or result[part + '_error'] = the exception's repr: a part that
    fails (a kernel that does not compile, out of memory) must not cost the parts after it on
    a GPU session that is paid by the minute."""
    try:
        result[part] = run()
    except Exception as e:
        result[part + "_error"] = repr(e)
        print(f"{part} failed: {e!r}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.render:
        with open(a.render) as f:
            result = json.load(f)
        with open(os.path.splitext(a.render)[0] + ".md", "w") as f:
            f.write(markdown(result))
        return result
    device = "cpu" if a.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --dry-run to check the script on CPU")
    time_ms = timer(device, a.reps, a.rep_ms)
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "bench_triton_gpu.json")
    records = []
    result = {
        "environment": environment(device),
        "dry_run": a.dry_run,
        "shape": {"B": a.batch, "Hq": a.hq, "Hkv": a.hkv, "D": a.head_dim, "S": a.seq,
                  "P": a.prefix_lens, "dtype": a.dtype, "causal": True, "decode_B": a.decode_batch},
        "flop_rule": "4*B*Hq*D*visible_pairs forward, 2.5x backward, 3.5x fwd+bwd",
        "decode_baseline_mask": "built and dropped once per forward, outside the timed call",
        "e2e_baseline_mask": "built once per forward, outside the timed call",
        "timing": (f"triton.testing.do_bench median, at least {a.reps} calls and {a.rep_ms:g} ms "
                   "of calls per measurement, L2 flushed before each call" if device == "cuda"
                   else f"wall-clock median of {a.reps} calls"),
        "records": records,
    }
    for P in a.prefix_lens:
        try:
            measured = bench_one(a, P, device, time_ms)
        except Exception as e:  # one prefix length failing must not cost the others
            result.setdefault("records_error", {})[str(P)] = repr(e)
            print(f"P={P} failed: {e!r}", flush=True)
            measured = []
            if device == "cuda":
                torch.cuda.empty_cache()
        for r in measured:
            records.append(r)
            print(f"{r['mode']:>4} P={P:<4} ours {r['ours_ms']:8.3f} ms {r['ours_tflops']:7.1f} TFLOP/s | "
                  f"{r['baseline']} {r['baseline_ms']:8.3f} ms {r['baseline_tflops']:7.1f} TFLOP/s | "
                  f"x{r['tflops_ratio']:.2f} (time x{r['time_ratio']:.2f})", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        # written after every P: a run cut short by a time limit keeps what it measured
        result["targets"] = check_targets(records)
        result["autotuned"] = autotuned_configs()
        _write(result, a.out)
    if "ablate" in a.mode_list:
        _guarded(result, "ablations", lambda: bench_ablations(a, device, time_ms))
        _write(result, a.out)
    if "profile" in a.mode_list:
        _guarded(result, "profile", lambda: bench_profile(a, device))
        _write(result, a.out)
    if "sweep" in a.mode_list:
        _guarded(result, "decode_sweep",
                 lambda: bench_decode_sweep(a, device, time_ms, "torch" if a.dry_run else "triton"))
        _write(result, a.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
