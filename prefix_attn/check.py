"""`prefix-attn check`: every available backend against the reference on random inputs.

One case exercises the whole contract at once: a bank of four entries of different
lengths (one selected by no row, one of length 0), GQA, left padding, odd lengths, a window,
a softcap, forward and backward. Tolerance (per output and gradient): the flash-attention rule, error vs the fp32 truth at most
twice the error of a same-dtype PyTorch computation, plus a small atol.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from . import cli_args, cli_parsers
from .api import prefix_attention
from .backends import available_backends, get_backend, load_errors
from .reference import prefix_attention_ref

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _inputs(dtype, device, seed=0, B=4, Hq=6, Hkv=2, Sq=19, Skv=37, D=40, N=4, P=21):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    args = (rnd(B, Hq, Sq, D), rnd(B, Hkv, Skv, D), rnd(B, Hkv, Skv, D), rnd(N, Hkv, P, D),
            rnd(N, Hkv, P, D))
    mask = torch.ones(B, Skv, dtype=torch.bool)
    mask[1, :5] = False
    mask[3, :11] = False
    kw = dict(prefix_ids=torch.tensor([2, 0, 2, 1], device=device),
              prefix_lens=torch.tensor([P, 0, 13, 8], device=device),  # entry 3: no row
              key_padding_mask=mask.to(device), window=29, softcap=30.0)
    return args, kw


def _err(x, y):
    return (x.double() - y.double()).abs().max().item()


def check_backend(name: str, dtype: torch.dtype, device: str, atol: float = 1e-4) -> dict:
    """Max errors of out and the five gradients; `ok` by the flash-attention rule."""
    args, kw = _inputs(dtype, device)
    out = prefix_attention(*args, **kw, backend=name)
    truth = prefix_attention_ref(*args, **kw)
    base = prefix_attention_ref(*args, **kw, upcast=False)
    # the output gradient is seeded too: the same table on every run
    g = torch.randn(truth.shape, generator=torch.Generator().manual_seed(1)).to(truth)
    results = {"out": (_err(out, truth), _err(base, truth))}
    for label, o in (("ours", out), ("truth", truth), ("base", base)):
        results[label + "_grads"] = torch.autograd.grad(o, args, g)
    for i, n in enumerate(("dq", "dk", "dv", "dprefix_k", "dprefix_v")):
        results[n] = (_err(results["ours_grads"][i], results["truth_grads"][i]),
                      _err(results["base_grads"][i], results["truth_grads"][i]))
    rows = {n: results[n] for n in ("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v")}
    ok = all(e <= 2 * b + atol for e, b in rows.values())
    # Report the output/gradient closest to its tolerance.
    worst = max(rows, key=lambda n: rows[n][0] / (2 * rows[n][1] + atol))
    return {"backend": name, "dtype": str(dtype).replace("torch.", ""), "device": device,
            "worst": worst, "max_err": rows[worst][0], "tolerance": 2 * rows[worst][1] + atol,
            "ok": ok}


def run_checks(backends: Optional[List[str]] = None, dtypes: Optional[List[str]] = None,
               device: Optional[str] = None, skipped: Optional[List[str]] = None) -> List[dict]:
    """A row per backend and dtype checked on ``device`` (default: each backend's own; an index,
    ``cuda:1``, places the tensors and the backends of its type run there); what is not run
    there is appended to ``skipped``, when given, with the reason."""
    rows = []
    skipped = [] if skipped is None else skipped
    for name in backends or available_backends():
        b = get_backend(name)
        dev = device or ("cuda" if "cpu" not in b.devices else "cpu")
        if torch.device(dev).type not in b.devices:
            skipped.append(f"{name} runs on {'/'.join(b.devices)} tensors, not {dev}")
            continue
        for dname in dtypes or list(DTYPES):
            dtype = DTYPES[dname]
            if name == "triton" and torch.device(dev).type == "cpu" and dtype == torch.bfloat16:
                skipped.append(f"{name} {dname} on {dev}: the Triton interpreter cannot compute "
                               "in bfloat16")
                continue
            try:
                rows.append(check_backend(name, dtype, dev))
            except Exception as e:  # report, don't hide: a crash is a failure
                rows.append({"backend": name, "dtype": dname, "device": dev, "worst": "-",
                             "max_err": float("nan"), "tolerance": float("nan"), "ok": False, "error": f"{type(e).__name__}: {e}"})
    return rows


def nothing_checked(skipped: List[str]) -> str:
    """The message when no backend and dtype ran at all (``skipped``: why each did not)."""
    return "nothing was checked: " + ("; ".join(skipped) or "no backend is available")


def format_table(rows: List[dict]) -> str:
    lines = ["| backend | device | dtype | worst of out/dq/dk/dv/dprefix | max error | tolerance | result |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        verdict = "pass" if r["ok"] else "FAIL" + (f" ({r['error']})" if "error" in r else "")
        lines.append(f"| {r['backend']} | {r['device']} | {r['dtype']} | {r['worst']} | "
                     f"{r['max_err']:.2e} | {r['tolerance']:.2e} | {verdict} |")
    return "\n".join(lines)


def add_parser(subparsers) -> argparse.ArgumentParser:
    return cli_parsers.add_parser(subparsers, "check", run)


def _usage_error(args) -> Optional[str]:
    """What is wrong with the requested backends / device, or None."""
    for name in args.backend or []:
        try:
            get_backend(name)
        except (ValueError, RuntimeError) as e:
            return str(e)
    if args.device is not None:
        problem = cli_args.device_problem(args.device)[1]
        if problem is not None:
            return problem
    # the check names each backend it runs: $PREFIX_ATTN_BACKEND chooses nothing here, but a
    # value that is no backend at all, or a bad switch, is wrong for every later command too
    return cli_args.env_problem(None, "the check")


def run(args) -> int:
    problem = _usage_error(args)
    if problem is not None:
        print(f"prefix-attn check: error: {problem}", file=sys.stderr)
        return 2
    print(cli_args.versions())
    print(f"available backends: {', '.join(available_backends())}")
    for mod, err in load_errors().items():
        print(f"  (not loaded: {mod}: {err})")
    skipped: List[str] = []
    rows = run_checks(args.backend, args.dtype, args.device, skipped)
    if not rows:  # nothing passed: not a pass
        print(f"prefix-attn check: error: {nothing_checked(skipped)}", file=sys.stderr)
        return 1
    print(format_table(rows))
    failed = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
