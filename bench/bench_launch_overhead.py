"""Host-side cost of launching the Triton kernels, measured on the CPU with the launches stubbed.

In decode the GPU work per layer is tens of microseconds, so the Python between the kernels
(index tensors, grid arithmetic, argument lists) is part of the step time: an H200 run at
B 64 / Skv 4096 had the three-launch cascade 0.21 ms slower than the per-row kernel. This
script times, in one run on the same tensors, the host work of

* ``attn_fwd``: the per-row forward (one launch);
* ``cascade_fwd`` as it is: a one-entry bank takes index tensors built once per shape;
* ``cascade_fwd`` with the sort-based grouping forced (the general path for mixed banks,
  and what a one-entry bank paid before), the baseline of the ratio.

`wrap_triton(kernel)[grid](...)` is replaced by a stub that evaluates the grid and returns,
so only our host code and torch's CPU ops are timed (a GPU adds launch latency per torch op,
so the savings there are larger). Tensors are CPU tensors; no GPU and no interpreter needed.

Writes <out>.json and <out>.md (default bench/results/launch_overhead.*).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real kernel objects (stubbed below)

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prefix_attn.kernels import decode, fwd  # noqa: E402
from record import (cpu_environment, loadavg, parser, provenance, rendered, table,  # noqa: E402
                    write_results)

SHAPES = [  # (B, Hq, Hkv, D, Skv, P): decode, one shared entry
    (64, 32, 8, 128, 4096, 128),
    (8, 32, 8, 128, 512, 2048),
    (1, 32, 8, 128, 32768, 0),
]


class _StubLaunch:
    """Stands in for torch.library.wrap_triton: evaluates the grid, launches nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if callable(grid):
                grid({"BLOCK_M": 64, "BLOCK_N": 64})
        return launch


def paired_us(variants: list, reps: int, blocks: int = 5) -> list:
    """Median microseconds per call of each variant (fn, context manager factory or None).
    The variants alternate block by block (one block of `reps` calls of each per round, each
    inside its context), so that a change of load on the shared cores hits all alike; the
    median is over the `blocks` rounds."""
    import contextlib

    def block(fn, ctx, n):
        with (ctx() if ctx else contextlib.nullcontext()):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / max(n, 1) * 1e6
    for fn, ctx in variants:
        block(fn, ctx, 20)  # warm-up
    meds = [[] for _ in variants]
    for _ in range(blocks):
        for (fn, ctx), m in zip(variants, meds):
            m.append(block(fn, ctx, reps))
    return [statistics.median(m) for m in meds]


def _sorted_grouping():
    """The sort-based grouping forced on the cascade (restored on exit)."""
    import contextlib

    @contextlib.contextmanager
    def forced():
        fast = decode._entry_tiles
        decode._entry_tiles = decode._sorted_entry_tiles
        try:
            yield
        finally:
            decode._entry_tiles = fast
    return forced()


def measure(reps: int) -> list:
    saved = fwd.wrap_triton, decode.wrap_triton
    fwd.wrap_triton = decode.wrap_triton = _StubLaunch
    try:
        return _measure(reps)
    finally:
        fwd.wrap_triton, decode.wrap_triton = saved


def _measure(reps: int) -> list:
    rows = []
    for B, Hq, Hkv, D, Skv, P in SHAPES:
        h = torch.float16
        q = torch.randn(B, Hq, 1, D, dtype=h)
        k, v = torch.empty(B, Hkv, Skv, D, dtype=h), torch.empty(B, Hkv, Skv, D, dtype=h)
        pk, pv = torch.randn(1, Hkv, P, D, dtype=h), torch.randn(1, Hkv, P, D, dtype=h)
        ids, lens = torch.zeros(B, dtype=torch.long), torch.tensor([P])
        out, lse = torch.empty_like(q), torch.empty(B, Hq, 1)
        args = (q, k, v, pk, pv, ids, lens, None, out, lse, True, D ** -0.5, -1, 0.0)
        per_row, cascade, sorted_path = paired_us(
            [(lambda: fwd.attn_fwd(*args), None), (lambda: decode.cascade_fwd(*args), None),
             (lambda: decode.cascade_fwd(*args), _sorted_grouping)], reps)
        rows.append({"B": B, "Hq": Hq, "Hkv": Hkv, "D": D, "Skv": Skv, "P": P,
                     "per_row_us": per_row, "cascade_us": cascade,
                     "cascade_sorted_us": sorted_path, "ratio": sorted_path / cascade})
        print(f"B {B} Skv {Skv} P {P}: per-row {per_row:.1f} us, cascade {cascade:.1f} us, "
              f"cascade with sort {sorted_path:.1f} us ({sorted_path / cascade:.2f}x)", flush=True)
    return rows


def markdown(res: dict) -> str:
    env = res["environment"]
    caption = (f"Host time per launch call (kernels stubbed), {env['cpu']}, {provenance(env)}; "
               f"medians of {res['blocks']} blocks of {res['reps']} calls"
               f"{', the variants alternating block by block' if res.get('timing') else ''}; ratio = sorted grouping / as is.")
    header = ["B", "Hq", "Hkv", "own keys", "P", "per-row fwd us", "cascade us",
              "cascade, sorted grouping us", "ratio"]
    return table(caption, header, [
        [r["B"], r["Hq"], r["Hkv"], r["Skv"], r["P"], f"{r['per_row_us']:.1f}",
         f"{r['cascade_us']:.1f}", f"{r['cascade_sorted_us']:.1f}", f"{r['ratio']:.2f}x"]
        for r in res["rows"]])


def main(argv=None) -> dict:
    p = parser(__doc__, "launch_overhead", reps=500)
    p.add_argument("--quick", action="store_true", help="20 calls per block (smoke run)")
    a = p.parse_args(argv)
    res = rendered(a, markdown)
    if res is not None:
        return res
    load_before = loadavg()
    rows = measure(20 if a.quick else a.reps)
    res = {"environment": cpu_environment(load_before), "reps": 20 if a.quick else a.reps, "blocks": 5,
           "rows": rows, "timing": "variants alternating block by block (paired_us), medians"}
    write_results(a.out, res, markdown(res), smoke=a.quick)
    return res


if __name__ == "__main__":
    main()
