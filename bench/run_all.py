"""Run every CPU benchmark, keep a history and refresh the README tables.

    python bench/run_all.py            # full sizes of each benchmark (`make bench`)
    python bench/run_all.py --quick    # smoke sizes, into a scratch folder (README untouched)
    python bench/run_all.py --only decode,memory

Each benchmark script writes `bench/results/<name>.json` (rows + machine/versions/date) and a
markdown table `<name>.md` (`--quick`: `<name>_quick.*`, a smoke run); the two plots the README
shows are drawn by their own scripts (`decode_cpu.png` by bench_decode.py, `memory.png` by
bench_memory.py, when matplotlib is installed); this script draws none. It appends every fresh
JSON to `bench/results/history.jsonl` and copies the markdown tables into README.md between the
`<!-- bench:NAME -->` / `<!-- /bench:NAME -->` markers, so every number the README shows comes
from a committed result file. GPU benchmarks run through `bench/gpu.sh` on a GPU machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# name -> (script, extra args for --quick, result stem, what the script's --out names:
#          "stem" = a path without extension, "dir" = the results folder). Every --quick run
# writes <stem>_quick (record.smoke_out), so a smoke run can never replace the result the
# README shows.
BENCHMARKS = {
    "cpu_kernel": ("bench_cpu_kernel.py", ["--quick"], "cpu_kernel", "stem"),
    "decode": ("bench_decode.py", ["--quick"], "decode_cpu", "stem"),
    "memory": ("bench_memory.py", ["--quick"], "memory", "dir"),
    "train": ("bench_train.py", ["--quick"], "train_cpu", "dir"),
    "launch": ("bench_launch_overhead.py", ["--quick"], "launch_overhead", "stem"),
    "sass": ("sass_report.py", ["--quick"], "sass_sm90", "dir"),
    "packed": ("bench_packed.py", ["--quick"], "packed_cpu", "stem"),
    "generate": ("bench_generate.py", ["--quick"], "generate_cpu", "stem"),
    "serve": ("bench_serve.py", ["--quick"], "serve_cpu", "stem"),
    "hf_overhead": ("bench_hf_overhead.py", ["--quick"], "hf_overhead", "stem"),
}


# results of bench/gpu.sh (GPU only, not rerun here): their README blocks are refreshed from
# the committed .md (bench_triton_gpu.py --render JSON writes it)
GPU_STEMS = ("triton_gpu",)


def run_one(name: str, quick: bool, out_dir: str) -> dict:
    script, quick_args, stem, out_kind = BENCHMARKS[name]
    path = os.path.join(HERE, script)
    if not os.path.exists(path):
        return {"name": name, "status": "missing", "script": script}
    out = os.path.join(out_dir, stem) if out_kind == "stem" else out_dir
    cmd = [sys.executable, path, "--out", out] + (quick_args if quick else [])
    print(f"\n$ {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}", flush=True)
    t0 = time.time()
    rc = subprocess.call(cmd, cwd=ROOT)
    status = "ok" if rc == 0 else f"exit {rc}"
    return {"name": name, "status": status, "seconds": round(time.time() - t0, 1),
            "stem": stem + "_quick" if quick else stem}


def append_history(out_dir: str, record: dict) -> None:
    js = os.path.join(out_dir, record["stem"] + ".json")
    if record["status"] != "ok" or not os.path.exists(js):
        return
    with open(js) as f:
        data = json.load(f)
    entry = {"benchmark": record["name"], "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "seconds": record["seconds"], "result": data}
    with open(os.path.join(out_dir, "history.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")


def refresh_readme(out_dir: str, readme: str = os.path.join(ROOT, "README.md")) -> list:
    """Replace each `<!-- bench:NAME -->...<!-- /bench:NAME -->` block with results/NAME.md."""
    with open(readme) as f:
        text = f.read()
    done = []
    for stem in sorted({b[2] for b in BENCHMARKS.values()} | set(GPU_STEMS)):
        md = os.path.join(out_dir, stem + ".md")
        pat = re.compile(rf"(<!-- bench:{stem} -->\n)(.*?)(<!-- /bench:{stem} -->)", re.S)
        if os.path.exists(md) and pat.search(text):
            with open(md) as f:
                table = f.read().strip() + "\n"
            text = pat.sub(lambda m: m.group(1) + table + m.group(3), text)
            done.append(stem)
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--no-readme", action="store_true", help="do not touch README.md")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    # Smoke runs go to a scratch folder: they must never overwrite the committed results.
    out_dir = tempfile.mkdtemp(prefix="prefix_attn_bench_") if args.quick else RESULTS
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for name in names:
        rec = run_one(name, args.quick, out_dir)
        append_history(out_dir, rec)
        records.append(rec)
    if not args.no_readme and not args.quick:
        print("README tables refreshed:", ", ".join(refresh_readme(out_dir)) or "none")
    print(f"results in {out_dir}")
    print("\n| benchmark | status | seconds |\n| --- | --- | --- |")
    for r in records:
        print(f"| {r['name']} | {r['status']} | {r.get('seconds', '-')} |")
    return 0 if all(r["status"] in ("ok", "missing") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
