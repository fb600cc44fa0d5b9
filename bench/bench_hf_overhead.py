"""Host cost of the Hugging Face attention path in decode, on the CPU: what `"prefix_attn"`
adds per layer per token over transformers' own `sdpa` at small batch.

At a small decode batch the work of one layer is a few microseconds, so the Python around the
kernel (argument checks, the backend choice, the mask and prefix decisions of the HF entry)
is a visible part of every generated token (on a GPU too: it is paid per layer per token,
before the launch). This script times, in one run:

* **per call**: the attention function HF calls in each layer at one decode step (q
  ``[1, 4, 1, 16]``, k/v ``[1, 2, 40, 16]``, no_grad): transformers' `sdpa_attention_forward`,
  the baseline, against `prefix_attn.hf.attention.attention_forward` on each available backend
  (``$PREFIX_ATTN_BACKEND``), without a prefix and with a one-entry selection; with
  ``triton`` installed, its backend too, kernels stubbed as in bench_launch_overhead.py (only
  the host code is timed; the op is registered as under the interpreter, a custom op);
* **generate**: ms per generated token of a tiny Llama (hidden 64, 8 layers, 4/2 heads,
  vocab 256), greedy, `sdpa` against `prefix_attn` without a prefix, with one bank entry
  (batch 1) and with mixed entries in a batch of 4 (sdpa at the same batch is its baseline).

Variants alternate block by block (per call) or run by run (generate); medians; ratios =
ours / sdpa from the same run. Writes <out>.json and <out>.md (default
bench/results/hf_overhead.*).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from importlib.util import find_spec

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
# the triton backend takes CPU tensors only when registered under the interpreter (before
# importing triton); its kernels are stubbed below, so nothing is interpreted
HAVE_TRITON = find_spec("triton") is not None
if HAVE_TRITON:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from prefix_attn import backends  # noqa: E402
from prefix_attn.bank import PrefixBank  # noqa: E402
from prefix_attn.hf.attention import attention_forward  # noqa: E402
from prefix_attn.hf.names import SELECTION_KWARG  # noqa: E402
from prefix_attn.tiny import tiny_model  # noqa: E402
from bench_launch_overhead import _StubLaunch, paired_us  # noqa: E402
if HAVE_TRITON:  # (that import unsets it)
    os.environ["TRITON_INTERPRET"] = "1"
from record import (cpu_environment, loadavg, parser, provenance, rendered, table,  # noqa: E402
                    write_results)

MODEL = dict(hidden=64, layers=8, heads=4, kv_heads=2, vocab_size=256)
CTX = 40  # own keys at the timed decode step
PREFIX = 8  # tokens of each bank entry
# (label, batch, prefixes= of generate; None: no prefix)
BLOCKS = 11
GENERATE = [("no prefix", 1, None), ("one entry", 1, "a"), ("mixed entries", 4, ["a", "b", None, "a"])]


def _models():
    ours = tiny_model("llama", seed=0, **MODEL)
    plain = tiny_model("llama", seed=0, attn_implementation="sdpa", **MODEL)
    plain.load_state_dict(ours.state_dict())
    bank = PrefixBank.attach(ours)
    g = torch.Generator().manual_seed(1)
    for name in ("a", "b"):
        bank.add_prompt(name, torch.randint(3, MODEL["vocab_size"], (PREFIX,), generator=g))
    return ours, plain


def _stubbed_triton():
    """A context in which the triton launches only evaluate their grid (None without triton)."""
    if not HAVE_TRITON or "triton" not in backends.available_backends():
        return None
    import contextlib

    from prefix_attn.kernels import decode, fwd

    @contextlib.contextmanager
    def stubbed():
        saved = fwd.wrap_triton, decode.wrap_triton
        fwd.wrap_triton = decode.wrap_triton = _StubLaunch
        try:
            yield
        finally:
            fwd.wrap_triton, decode.wrap_triton = saved
    return stubbed


def _with_backend(name, stub=None):
    """A context factory: $PREFIX_ATTN_BACKEND = name (and the triton stub) inside."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        old = os.environ.get(backends.ENV_BACKEND)
        os.environ[backends.ENV_BACKEND] = name
        try:
            with (stub() if stub else contextlib.nullcontext()):
                yield
        finally:
            if old is None:
                os.environ.pop(backends.ENV_BACKEND, None)
            else:
                os.environ[backends.ENV_BACKEND] = old
    return ctx


def per_call(ours, reps: int) -> list:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = ours.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = torch.randn(1, 2, CTX, 16, generator=g), torch.randn(1, 2, CTX, 16, generator=g)
    sel = ours.prefix_bank.select("a", batch_size=1)
    stub = _stubbed_triton()
    names = [n for n in ("cpu", "torch") if n in backends.available_backends()]
    names += ["triton"] if stub else []
    variants = [(lambda: sdpa_attention_forward(module, q, k, v, None, scaling=0.25), None)]
    for name in names:
        ctx = _with_backend(name, stub if name == "triton" else None)
        variants.append((lambda: attention_forward(module, q, k, v, None, scaling=0.25), ctx))
        variants.append((lambda: attention_forward(module, q, k, v, None, scaling=0.25,
                                                   **{SELECTION_KWARG: sel}), ctx))
    with torch.no_grad():
        us = paired_us(variants, reps, BLOCKS)
    rows = [{"call": "sdpa_attention_forward", "backend": "-", "prefix": "-", "us": us[0], "ratio": 1.0}]
    for i, name in enumerate(names):
        for j, prefix in enumerate(("none", "one entry")):
            t = us[1 + 2 * i + j]
            rows.append({"call": "attention_forward", "backend": name + (" (stubbed)" if name == "triton" else ""),
                         "prefix": prefix, "us": t, "ratio": t / us[0]})
    for r in rows:
        print(f"{r['call']} {r['backend']} prefix {r['prefix']}: {r['us']:.1f} us ({r['ratio']:.2f}x)", flush=True)
    return rows


def generate(ours, plain, new: int, reps: int) -> list:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    g = torch.Generator().manual_seed(2)
    runs = {}
    for label, B, prefixes in GENERATE:
        ids = torch.randint(3, MODEL["vocab_size"], (B, 8), generator=g)
        extra = {} if prefixes is None else {"prefixes": prefixes}
        runs[(label, "ours")] = (lambda ids=ids, extra=extra: ours.generate(ids, **extra, **kw))
        runs[(label, "sdpa")] = (lambda ids=ids: plain.generate(ids, **kw))
    times = {key: [] for key in runs}
    with torch.no_grad():
        tokens = {key: fn() for key, fn in runs.items()}  # warm-up
        if not torch.equal(tokens[("no prefix", "ours")], tokens[("no prefix", "sdpa")]):
            raise SystemExit("prefix_attn and sdpa disagree without a prefix")
        for _ in range(reps):  # interleaved: a change of load hits all alike
            for key, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) / new * 1e3)
    rows = []
    for label, B, prefixes in GENERATE:
        ours_ms = statistics.median(times[(label, "ours")])
        sdpa_ms = statistics.median(times[(label, "sdpa")])
        rows.append({"case": label, "B": B, "prefixes": prefixes, "sdpa_ms": sdpa_ms,
                     "ours_ms": ours_ms, "ratio": ours_ms / sdpa_ms,
                     "extra_us_per_layer": (ours_ms - sdpa_ms) * 1e3 / MODEL["layers"]})
        print(f"generate {label} B {B}: sdpa {sdpa_ms:.2f} ms/token, ours {ours_ms:.2f} "
              f"({ours_ms / sdpa_ms:.2f}x)", flush=True)
    return rows


def markdown(res: dict) -> str:
    env = res["environment"]
    cap1 = (f"Per call of the attention function in one decode step (q [1, 4, 1, 16], k/v "
            f"[1, 2, {res['ctx']}, 16], fp32, no_grad), {env['cpu']}, {env['threads']} threads, "
            f"{provenance(env)}; medians of {res['blocks']} blocks of {res['reps']} calls, the "
            f"variants alternating block by block; ratio = this / sdpa_attention_forward, same run"
            f"; triton: kernels stubbed (host code only).")
    t1 = table(cap1, ["function", "backend", "prefix", "us per call", "vs sdpa"], [
        [r["call"], r["backend"], r["prefix"], f"{r['us']:.1f}", f"{r['ratio']:.2f}x"]
        for r in res["per_call"]])
    m = res["model"]
    cap2 = (f"generate, greedy, {res['new']} new tokens after 8 prompt tokens, Llama hidden "
            f"{m['hidden']}, {m['layers']} layers, {m['heads']}/{m['kv_heads']} heads, vocab {m['vocab_size']}, bank entries of "
            f"{res['prefix_len']} tokens; medians of {res['gen_reps']} interleaved runs; extra "
            f"us per layer = (ours - sdpa) per token / layers.")
    t2 = table(cap2, ["case", "B", "sdpa ms/token", "prefix_attn ms/token", "vs sdpa",
                      "extra us per layer"], [
        [r["case"], r["B"], f"{r['sdpa_ms']:.2f}", f"{r['ours_ms']:.2f}", f"{r['ratio']:.2f}x",
         f"{r['extra_us_per_layer']:.0f}"] for r in res["generate"]])
    return t1 + "\n" + t2


def main(argv=None) -> dict:
    p = parser(__doc__, "hf_overhead", reps=300)
    p.add_argument("--quick", action="store_true", help="few calls and runs (smoke run)")
    p.add_argument("--gen-reps", type=int, default=7, help="generate runs per case")
    a = p.parse_args(argv)
    res = rendered(a, markdown)
    if res is not None:
        return res
    reps, gen_reps, new = (50, 1, 4) if a.quick else (a.reps, a.gen_reps, 64)
    load_before = loadavg()
    # one thread: the host work timed here is serial, and intra-op threads on shared cores
    # made single calls spike by milliseconds
    torch.set_num_threads(1)
    ours, plain = _models()
    calls = per_call(ours, reps)
    gen = generate(ours, plain, new, gen_reps)
    res = {"environment": cpu_environment(load_before), "reps": reps, "blocks": BLOCKS, "ctx": CTX,
           "per_call": calls, "model": MODEL, "new": new, "prefix_len": PREFIX,
           "gen_reps": gen_reps, "generate": gen}
    write_results(a.out, res, markdown(res), smoke=a.quick)
    return res


if __name__ == "__main__":
    main()
