"""Serving a long shared system prompt end to end: `model.generate` on this CPU, three ways.

A batch of requests that all start with the same system prompt, greedy decoding through
transformers' `generate`, a Llama-shaped model (GQA) in fp32:

- **prompt in every row**: the plain model (`sdpa`) given system prompt + request per row;
  every call prefills the whole prompt for every row (what a server without prompt caching
  does);
- **cached prompt, copied per row**: the system prompt's KV cache computed once (one prefill,
  outside the timing), copied into every row of the batch for each call
  (`DynamicCache.batch_repeat_interleave`, transformers' prompt-reuse recipe); decode reads B
  copies of it;
- **ours**: the prompt's KV added once to the bank (`bank.add_prompt`, outside the timing);
  each call passes only the requests with `prefixes=["system"] * B`; the kernel reads one copy.

The three give the same tokens (checked before timing). Timed: whole generate calls
(prefill of the requests + decode), medians of interleaved runs, in one run.

Writes <out>.json and <out>.md (default bench/results/generate_cpu.*).
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from prefix_attn.bank import PrefixBank  # noqa: E402
from prefix_attn.hf import cache_kwarg  # noqa: E402
from prefix_attn.tiny import tiny_model  # noqa: E402
from record import (cpu_environment, loadavg, parser, provenance, rendered, table,  # noqa: E402
                    write_results)

MODEL = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096)
# (system prompt tokens P, requests B, request tokens S, new tokens, time "prompt in every row":
# its prefill of B * (P + S) tokens takes minutes at the largest shape)
SHAPES = [
    (512, 8, 16, 32, True),
    (1024, 16, 16, 32, True),
    (2048, 64, 16, 32, False),
]
QUICK_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
QUICK = [(48, 3, 5, 4, True)]


def _models(cfg):
    ours = tiny_model("llama", seed=0, **cfg).eval()
    plain = tiny_model("llama", seed=0, attn_implementation="sdpa", **cfg).eval()
    plain.load_state_dict(ours.state_dict())
    return ours, plain


def _runs(ours, plain, P, B, S, new, with_prompt=True):
    g = torch.Generator().manual_seed(0)
    vocab = ours.config.vocab_size
    system = torch.randint(3, vocab, (1, P), generator=g)
    requests = torch.randint(3, vocab, (B, S), generator=g)
    full = torch.cat([system.expand(B, P), requests], 1)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        out = plain(system, use_cache=True)
    prompt_cache = getattr(out, "cache", None)  # transformers >= 5.2x; older: past_key_values
    if prompt_cache is None:
        prompt_cache = out.past_key_values
    PrefixBank.attach(ours).add_prompt("system", system[0])

    def concatenated():
        return plain.generate(full, **kw)[:, P + S:]

    def cached_copy():
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(B)
        return plain.generate(full, **{cache_kwarg(plain): cache}, **kw)[:, P + S:]

    def fused():
        return ours.generate(requests, prefixes=["system"] * B, **kw)[:, S:]

    runs = {"prompt in every row": concatenated} if with_prompt else {}
    runs.update({"cached prompt, copied per row": cached_copy, "ours (prefix bank)": fused})
    return runs


def measure(cfg, shapes, reps: int) -> list:
    ours, plain = _models(cfg)
    rows = []
    for P, B, S, new, with_prompt in shapes:
        runs = _runs(ours, plain, P, B, S, new, with_prompt)
        with torch.no_grad():
            tokens = {name: fn() for name, fn in runs.items()}  # also the warm-up
        first = next(iter(tokens.values()))
        same = all(torch.equal(t, first) for t in tokens.values())
        if not same:
            raise SystemExit(f"the three ways disagree at P={P} B={B}: {tokens}")
        times = {name: [] for name in runs}
        with torch.no_grad():
            for _ in range(reps):  # interleaved: load changes hit all three alike
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows.append(dict(P=P, B=B, S=S, new=new, ms=ms, same_tokens=same,
                         prompt_copies_bytes=_copy_bytes(ours, B)))
        print(rows[-1], flush=True)
        ours.prefix_bank.remove("system")
    return rows


def _copy_bytes(model, B):
    """Bytes of the prompt's KV held during a call: one copy in the bank, or one per row."""
    one = model.prefix_bank.entry_nbytes("system")
    return {"ours": one, "copied per row": one * B}


def markdown(res: dict) -> str:
    env, cfg = res["environment"], res["model"]
    caption = (f"generate, greedy, a shared system prompt of P tokens + B requests of S tokens, "
               f"`new` tokens each; Llama-shaped, hidden {cfg['hidden_size']}, "
               f"{cfg['num_hidden_layers']} layers, {cfg['num_attention_heads']}/"
               f"{cfg['num_key_value_heads']} heads, fp32, {env['cpu']}, {env['threads']} threads, "
               f"{provenance(env)}; medians of {res['reps']} interleaved "
               f"runs; the same tokens from every way (checked); "
               "speedup = baseline ms / ours ms, same run; — : not timed (a prefill of B x (P + S) "
               "tokens per call).")
    header = ["P", "B", "S", "new", "prompt in every row ms", "cached prompt copied per row ms",
              "ours ms", "vs prompt in every row", "vs cached copy", "prompt KV held: copies / ours"]
    rows = []
    for r in res["rows"]:
        ms = r["ms"]
        ours = ms["ours (prefix bank)"]
        every = ms.get("prompt in every row")
        held = r["prompt_copies_bytes"]
        rows.append([r["P"], r["B"], r["S"], r["new"], "—" if every is None else f"{every:.0f}",
                     f"{ms['cached prompt, copied per row']:.0f}", f"{ours:.0f}",
                     "—" if every is None else f"{every / ours:.2f}x",
                     f"{ms['cached prompt, copied per row'] / ours:.2f}x",
                     f"{held['copied per row'] / 2**20:.1f} / {held['ours'] / 2**20:.2f} MiB"])
    return table(caption, header, rows)


def main(argv=None) -> dict:
    p = parser(__doc__, "generate_cpu", reps=3)
    p.add_argument("--quick", action="store_true", help="a tiny model and shape (smoke run)")
    a = p.parse_args(argv)
    res = rendered(a, markdown)
    if res is not None:
        return res
    load_before = loadavg()
    cfg = QUICK_MODEL if a.quick else MODEL
    rows = measure(cfg, QUICK if a.quick else SHAPES, a.reps)
    res = {"environment": cpu_environment(load_before), "model": cfg, "reps": a.reps, "rows": rows}
    write_results(a.out, res, markdown(res), smoke=a.quick)
    return res


if __name__ == "__main__":
    main()
