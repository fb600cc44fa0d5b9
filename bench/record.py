"""What every CPU benchmark script records with its rows: the machine and versions, and the
two result files (``<out>.json`` and the markdown table ``<out>.md`` that run_all.py copies
into the README)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parser(doc: str, stem: str, reps: int) -> argparse.ArgumentParser:
    """The script's command line: ``--out`` (default ``bench/results/<stem>``) and ``--reps``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(RESULTS, stem), help="output path without extension")
    p.add_argument("--reps", type=int, default=reps)
    return p


def cpu_environment() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def table(caption: str, header: list, rows: list) -> str:
    """A caption line, then a markdown table of already formatted cells."""
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out: str, res: dict, markdown: str) -> None:
    """``out`` is a path without extension."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown)
    print(f"wrote {out}.json / .md")
