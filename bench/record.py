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
    """The script's command line: ``--out`` (default ``bench/results/<stem>``), ``--reps`` and
    ``--render JSON`` (rewrite the .md next to a result JSON from it: `rendered`)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(RESULTS, stem), help="output path without extension")
    p.add_argument("--reps", type=int, default=reps)
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md next to a result JSON")
    return p


def rendered(a, markdown) -> dict:
    """With --render JSON: the result read back and its .md rewritten by ``markdown`` (no
    measurement); else None."""
    if not getattr(a, "render", None):
        return None
    with open(a.render) as f:
        res = json.load(f)
    with open(os.path.splitext(a.render)[0] + ".md", "w") as f:
        f.write(markdown(res))
    return res


def versions() -> dict:
    """torch, transformers and peft versions (None where not installed: the baselines follow
    the installed transformers), and on a GPU triton and CUDA."""
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        try:
            import triton
            out["triton"] = triton.__version__
        except ImportError:
            out["triton"] = None
    return out


def loadavg() -> list:
    """The 1/5/15-minute load averages now (the cores are shared: record them before and after
    a run, a 1-minute value near the core count means the figures were taken under load)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_environment(load_before=None) -> dict:
    """The machine, the versions and the date; load_before: loadavg() taken before the run
    (the 1-minute load after the run is `load`)."""
    env = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           **versions(), "load": os.getloadavg()[0],
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if load_before is not None:
        env["load_before"] = load_before[0]
    return env


def provenance(env: dict) -> str:
    """'date, torch X, transformers Y, peft Z, load average a before / b after' of an
    environment record; a field an older result did not record reads 'not recorded'."""
    def get(key):
        v = env.get(key)
        return "not recorded" if v is None else v
    date = env.get("date") or env.get("timestamp")
    load = (f"load average {env['load_before']:.2f} before / {env['load']:.2f} after"
            if env.get("load_before") is not None and env.get("load") is not None else
            f"load average not recorded before / {env['load']:.2f} after"
            if env.get("load") is not None else "load average not recorded")
    return (f"{date[:10] if date else 'date not recorded'}, torch {get('torch')}, "
            f"transformers {get('transformers')}, {load}")


# A smoke run (--quick) writes <stem>_quick, never the stem whose table the README shows (a
# later run_all refresh would publish it), and its caption says what it is.
SMOKE_CAPTION = "Smoke run (--quick sizes: checks the script, not figures to quote). "


def smoke_out(out: str, smoke: bool) -> str:
    """``out`` (a path without extension, or a result stem) as a smoke run writes it."""
    return out + "_quick" if smoke and not out.endswith("_quick") else out


def table(caption: str, header: list, rows: list) -> str:
    """A caption line, then a markdown table of already formatted cells."""
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out: str, res: dict, markdown: str, smoke: bool = False) -> None:
    """``out`` is a path without extension; a smoke run writes ``<out>_quick``, its caption
    marked (``res`` records ``"smoke": true``)."""
    if smoke:
        out, res, markdown = smoke_out(out, True), dict(res, smoke=True), SMOKE_CAPTION + markdown
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(out + ".md", "w") as f:
        f.write(markdown)
    print(f"wrote {out}.json / .md")
