"""Memory of serving N prefixes to B rows: the prefix bank vs PEFT's path, one decode step.

Model: a Llama-shaped decoder with the KV shape of Llama-3-8B (32 layers, Hq 32, Hkv 8,
D 128) at reduced width (hidden 256, MLP 512, vocabulary 256: the prefix memory does not
depend on the width), bf16, CPU. Prefixes: P = 100 virtual tokens per entry.

Rows use entries round robin (row b -> entry b mod N), own prompts of S = 16 tokens with
left padding (row b has b mod 4 pad tokens, so a padding mask exists as in batch serving).

- ours: ``PrefixBank`` with N entries, ``attn_implementation="prefix_attn"``, ``prefixes=``;
  the KV cache holds own tokens only; a batch reads a view of its entry (one shared entry) or
  one stack of the unique entries used (cached across decode steps).
- PEFT's path: what ``PeftModel.get_prompt`` + ``DynamicCache`` + HF ``sdpa`` do, per row:
  each row's prefix copied into its KV cache rows ([B, Hkv, P + S, D] per layer), the cache
  grown by ``torch.cat`` at every step, and keys / values repeated per query head
  (``repeat_kv``) for SDPA when a mask is present. PEFT itself serves one adapter per batch;
  for N > 1 the per-row gather is the same copy that PEFT makes for one adapter. The adapter
  weights PEFT holds ([P, L*2*Hkv*D] per adapter) are the same bytes as a bank entry.

Measured: "prefix bytes held" = bytes of live tensors that exist for the prefixes while
serving (ours: bank entries + cached selection stack; PEFT: adapter weights + the prefix part
of the per-row KV cache); "step peak" = the most bytes allocated above the level before one
decode step (torch profiler allocation events, CPU allocator). Also checked: the two paths
give the same next-token logits.

Run: ``python bench/bench_memory.py`` (about ten minutes on 2 shared cores: the committed run
recorded 612.7 s; ``--quick`` for a small smoke run, written as memory_quick.*).
Writes ``bench/results/memory.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import prefix_attn  # noqa: E402
from prefix_attn.bank import PrefixBank  # noqa: E402
from prefix_attn.hf import cache_kwarg  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MiB = 2 ** 20


# -- measuring -------------------------------------------------------------------------------
def step_peak_bytes(prepare, step) -> tuple[int, object, object]:
    """(most bytes allocated above the level at the start of ``step(state)``, state, step's result).

    ``state = prepare()`` and ``step(state)`` both run under the torch profiler so that every
    block the step may free (e.g. the KV cache that ``torch.cat`` replaces) was allocated in
    view of the profiler: frees of blocks allocated before profiling are not reported, which
    would overstate the peak. The level is the running sum of the recorded allocation sizes."""
    from alloc_peak import peak_in_window
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        state = prepare()
        gc.collect()
        with record_function("decode_step"):
            result = step(state)
    return peak_in_window(prof, "decode_step"), state, result


def cache_tensors(cache):
    for layer in cache.layers:
        yield layer.keys, layer.values


# -- the model and the batch ----------------------------------------------------------------
def build_model(layers, heads, kv_heads, head_dim, dtype, attn):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=layers, num_attention_heads=heads,
                                   num_key_value_heads=kv_heads, head_dim=head_dim,
                                   max_position_embeddings=1024, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype).eval()


def batch_inputs(B, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    for b in range(B):
        pad = b % 4
        ids[b, :pad] = 0
        mask[b, :pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    nxt = torch.randint(3, 256, (B, 1), generator=g)
    return ids, mask, pos, nxt


# -- the two paths -----------------------------------------------------------------------------
def run_ours(model, bank, rows, ids, mask, pos, nxt):
    """Prefill then one measured decode step through the bank. Returns a dict of numbers."""
    B, S = ids.shape
    mask2 = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
    pos2 = pos[:, -1:] + 1

    def prefill():
        out = model(ids, attention_mask=mask, position_ids=pos, prefixes=rows, use_cache=True)
        return out.cache if getattr(out, "cache", None) is not None else out.past_key_values

    def step(cache):
        return model(nxt, attention_mask=mask2, position_ids=pos2, prefixes=rows,
                     **{cache_kwarg(model): cache}, use_cache=True).logits[:, -1].float()

    with torch.no_grad():
        peak, cache, logits = step_peak_bytes(prefill, step)
    own = sum(k.nbytes + v.nbytes for k, v in cache_tensors(cache))
    sel = bank.select(rows, B)
    return {"prefix_held": bank.nbytes + bank.cache_nbytes, "batch_prefix": bank.cache_nbytes,
            "selection_is_view": sel.is_view, "kv_cache": own, "step_peak": peak}, logits


def run_peft_path(model, bank, rows, ids, mask, pos, nxt):
    """PEFT's per-row prefix in the KV cache (get_prompt + DynamicCache) and HF sdpa."""
    from transformers import DynamicCache

    B, S = ids.shape
    P = max(bank.entry_len(r) for r in set(rows))
    pmask = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1)
    mask2 = torch.cat([pmask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
    pos2 = pos[:, -1:] + 1 + P
    copies = {}

    def prefill():
        cache = DynamicCache()
        for layer in range(bank.num_layers):
            # the per-row copy PEFT's get_prompt makes (embedding.weight.repeat(batch_size, ...))
            k = torch.stack([bank.entry_kv(r)[layer, 0] for r in rows])
            v = torch.stack([bank.entry_kv(r)[layer, 1] for r in rows])
            cache.update(k, v, layer)
        copies["bytes"] = sum(k.nbytes + v.nbytes for k, v in cache_tensors(cache))
        out = model(ids, attention_mask=pmask, position_ids=pos + P, **{cache_kwarg(model): cache},
                    use_cache=True)
        return out.cache if getattr(out, "cache", None) is not None else out.past_key_values

    def step(cache):
        return model(nxt, attention_mask=mask2, position_ids=pos2, **{cache_kwarg(model): cache},
                     use_cache=True).logits[:, -1].float()

    with torch.no_grad():
        peak, cache, logits = step_peak_bytes(prefill, step)
    total_cache = sum(k.nbytes + v.nbytes for k, v in cache_tensors(cache))
    adapters = sum(bank.entry_nbytes(n) for n in bank.names())
    prefix_copy = copies["bytes"]
    return {"prefix_held": adapters + prefix_copy, "batch_prefix": prefix_copy,
            "kv_cache": total_cache - prefix_copy, "step_peak": peak}, logits


# -- driver -------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 layers, N in {1, 4}, B in {2, 8}: a smoke run")
    ap.add_argument("--n", type=int, nargs="+", help="numbers of entries N (default 1 16 256)")
    ap.add_argument("--b", type=int, nargs="+", help="batch sizes B (default 8 64)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    if args.quick:
        L, Ns, Bs, P, S = 4, [1, 4], [2, 8], 20, 8
    else:
        L, Ns, Bs, P, S = 32, [1, 16, 256], [8, 64], 100, 16
    Ns, Bs = args.n or Ns, args.b or Bs
    Hq, Hkv, D, dtype = 32, 8, 128, getattr(torch, args.dtype)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    ours_model = build_model(L, Hq, Hkv, D, dtype, "prefix_attn")
    peft_model = build_model(L, Hq, Hkv, D, dtype, "sdpa")
    peft_model.load_state_dict(ours_model.state_dict())
    bank = PrefixBank.attach(ours_model)
    rows_out = []
    t0 = time.time()
    for N in Ns:
        bank.clear()
        g = torch.Generator().manual_seed(N)
        for n in range(N):
            shape = (L, Hkv, P, D)
            bank.add(f"p{n}", torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
        for B in Bs:
            rows = [f"p{b % N}" for b in range(B)]
            ids, mask, pos, nxt = batch_inputs(B, S)
            ours, lo = run_ours(ours_model, bank, rows, ids, mask, pos, nxt)
            ours["step_total"] = ours["prefix_held"] + ours["kv_cache"] + ours["step_peak"]
            bank.clear_cache()  # the PEFT path must not count (or reuse) our cached stack
            gc.collect()
            peft, lp = run_peft_path(peft_model, bank, rows, ids, mask, pos, nxt)
            peft["step_total"] = peft["prefix_held"] + peft["kv_cache"] + peft["step_peak"]
            gc.collect()
            diff = (lo - lp).abs().max().item()
            scale = lp.abs().max().item()
            row = {"N": N, "B": B, "unique_used": len(set(rows)), "entry_bytes": bank.entry_nbytes("p0"),
                   "ours": ours, "peft": peft, "logits_max_abs_diff": diff, "logits_max_abs": scale,
                   "prefix_held_ratio": peft["prefix_held"] / ours["prefix_held"],
                   "step_total_ratio": peft["step_total"] / ours["step_total"]}
            rows_out.append(row)
            print(f"N={N:4d} B={B:3d}  prefix held MiB: ours {ours['prefix_held'] / MiB:9.1f}  "
                  f"peft {peft['prefix_held'] / MiB:9.1f}  | step total MiB: ours {ours['step_total'] / MiB:8.1f}  "
                  f"peft {peft['step_total'] / MiB:8.1f}  | logits diff {diff:.3g} (max |logit| {scale:.3g})",
                  flush=True)
    elapsed = time.time() - t0

    from prefix_attn.backends import available_backends

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "prefix_attn": prefix_attn.__version__},
        "backends": available_backends(),
        "backend_used": os.environ.get("PREFIX_ATTN_BACKEND") or available_backends()[0],
        "shape": {"layers": L, "q_heads": Hq, "kv_heads": Hkv, "head_dim": D, "prefix_len": P,
                  "own_tokens": S, "dtype": str(dtype), "hidden": 256},
        "quick": args.quick, "seconds": round(elapsed, 1),
    }
    write_results(args.out, meta, rows_out, "memory_quick" if args.quick else "memory")


def write_results(folder, meta, rows, stem):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    s = meta["shape"]
    lines = [
        f"# Prefix memory, one decode step ({meta['date']})",
        "",
        ("Smoke run (--quick sizes: checks the script, not figures to quote). " if meta.get("quick") else "")
        + f"Llama-shaped: {s['layers']} layers, Hq {s['q_heads']}, Hkv {s['kv_heads']}, D {s['head_dim']}, "
        f"P {s['prefix_len']}, {s['own_tokens']} own tokens, {s['dtype']}, hidden {s['hidden']}; "
        f"{meta['machine']['processor']}, torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}, prefix_attn backend `{meta['backend_used']}`. "
        "MiB. *batch prefix*: prefix bytes made for this batch (ours: the stack of the unique entries used, "
        "0 when one entry is read in place; PEFT: the per-row copies in the KV cache). *held*: that plus the "
        "stored entries (bank entries / adapter weights, the same bytes). *KV*: the own-token KV cache. "
        "*transient*: most bytes allocated above the starting level during one decode step. "
        "*step total* = held + KV + transient: prefix-related memory at the step's peak (model weights excluded).",
        "",
        "| N | B | unique used | batch prefix ours | batch prefix PEFT | held ours | held PEFT | held PEFT/ours "
        "| KV ours | KV PEFT | transient ours | transient PEFT | step total ours | step total PEFT | total PEFT/ours "
        "| logits max diff |",
        "|" + "---:|" * 16,
    ]
    for r in rows:
        o, p = r["ours"], r["peft"]
        cells = [r["N"], r["B"], r["unique_used"]]
        for key in ("batch_prefix", "prefix_held"):
            cells += [f"{o[key] / MiB:.1f}", f"{p[key] / MiB:.1f}"]
        cells.append(f"{r['prefix_held_ratio']:.1f}x")
        for key in ("kv_cache", "step_peak", "step_total"):
            cells += [f"{o[key] / MiB:.1f}", f"{p[key] / MiB:.1f}"]
        cells += [f"{r['step_total_ratio']:.1f}x", f"{r['logits_max_abs_diff']:.2g}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    with open(os.path.join(folder, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)
        return
    labels = [f"N={r['N']}\nB={r['B']}" for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "prefix_held", "prefix bytes held (MiB)"),
                           (axes[1], "step_total", "prefix + KV + transient at one decode step (MiB)")):
        ax.bar([i - 0.2 for i in x], [r["ours"][key] / MiB for r in rows], 0.4, label="prefix bank (ours)")
        ax.bar([i + 0.2 for i in x], [r["peft"][key] / MiB for r in rows], 0.4, label="PEFT path")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{s['layers']} layers, Hkv {s['kv_heads']}, D {s['head_dim']}, P {s['prefix_len']}, {s['dtype']}")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, stem + ".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
