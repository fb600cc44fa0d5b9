"""One prefix-tuning training step (forward + backward + AdamW), ours vs PEFT, on this CPU
(or a GPU with ``--device cuda``).

Model: a Llama-shaped decoder, hidden 512, 8 layers, Hq 8 / Hkv 2 (head dim 64), MLP 1408,
vocabulary 4096 (``--vocab``; a small LM head keeps the step about the layers, where the prefix
lives), fp32. Batch B = 8 rows of S = 256 tokens (labels = inputs), prefix P = 32 virtual
tokens. Both providers start from the same base weights and the same initial prefix (PEFT's
random init copied into ours), so their first losses must agree (checked).

- ``peft``: ``peft.get_peft_model(PrefixTuningConfig(num_virtual_tokens=32))`` on the model
  with ``attn_implementation="sdpa"`` (PEFT expands the prefix per row into a DynamicCache and
  concatenates; SDPA gets a dense mask).
- ``ours``: ``prefix_attn.prefix_tuning(model, 32)`` with ``attn_implementation="prefix_attn"``
  (one copy of the prefix read by the fused kernel, ``prefixes=[name] * B``).
- ``ours+ckpt``: the same with ``model.gradient_checkpointing_enable()`` (PEFT refuses it).

Time: median over ``--steps`` steps after one warm-up, the providers interleaved step by step
in one process (so both see the same machine load). Peak: bytes allocated above the level
before the step, the most during one step (torch profiler memory events of the CPU allocator).

Run: ``python bench/bench_train.py`` (a few minutes on 2 cores; ``--quick`` for a smoke run).
Writes ``bench/results/train_cpu.json`` and ``bench/results/train_cpu.md``.

On a GPU (``--device cuda [--dtype bf16]``, written as ``train_gpu.*``): wall time with the
device synchronised around each step, peak = the CUDA allocator's high-water mark during one
step above the level before it; the profiled attention share is not measured there.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import prefix_attn  # noqa: E402
from prefix_attn.tuning import enable_checkpointing, prefix_tuning  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from record import loadavg, versions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MiB = 2 ** 20


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_model(args, attn):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.mlp, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   max_position_embeddings=2 * (args.seq + args.prefix), pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    # built in fp32 and cast: the same weights whatever the dtype
    return model.to(device=args.device, dtype=DTYPES[args.dtype]).train()


def make_providers(args):
    """{name: (step_fn, first_loss)}; every step_fn runs one full optimizer step."""
    import peft

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)

    base = build_model(args, "sdpa")
    pcfg = peft.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM, num_virtual_tokens=args.prefix)
    pm = peft.get_peft_model(base, pcfg)
    pm.to(device=args.device, dtype=DTYPES[args.dtype]).train()
    init = pm.prompt_encoder["default"].state_dict()
    providers = {}

    enc = pm.prompt_encoder["default"]
    opt_p = torch.optim.AdamW(enc.parameters(), lr=1e-3)

    def peft_step():
        opt_p.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            loss = pm(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt_p.step()
        return loss.detach()

    providers["peft"] = peft_step

    def ours_provider(checkpointing):
        model = build_model(args, "prefix_attn")
        module = prefix_tuning(model, num_virtual_tokens=args.prefix, name="task")
        module.load_state_dict(init)
        if checkpointing:
            enable_checkpointing(model)
        opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
        rows = ["task"] * args.batch

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(ids, attention_mask=mask, labels=ids, prefixes=rows).loss
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    providers["ours"] = ours_provider(False)
    providers["ours+ckpt"] = ours_provider(True)
    return providers


def synced(step, device: str):
    """step, followed by a device synchronisation on CUDA (so wall time covers the work)."""
    if device != "cuda":
        return step

    def run():
        out = step()
        torch.cuda.synchronize()
        return out
    return run


def cuda_step_peak_bytes(step) -> int:
    """Most bytes the CUDA allocator held above its starting level during one ``step()``."""
    gc.collect()
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def step_peak_bytes(step) -> int:
    """Most bytes allocated above the starting level during one ``step()``.

    Two steps run under the profiler and the second is measured, so that every block it frees
    was allocated in view of the profiler (frees of older blocks are not reported, which would
    overstate the peak). The level is the running sum of the CPU allocator's allocation (+) and
    free (-) events."""
    from alloc_peak import peak_in_window
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
        with record_function("measured_step"):
            step()
    return peak_in_window(prof, "measured_step")


def attention_share(step) -> tuple[float, float]:
    """(self CPU ms of the attention ops, self CPU ms of all ops) in one profiled ``step()``:
    ``prefix_attn::*`` ops for ours, ``scaled_dot_product*`` ops for PEFT's SDPA."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in rows)
    attn = sum(e.self_cpu_time_total for e in rows
               if "prefix_attn" in e.key or "scaled_dot_product" in e.key)
    return attn / 1e3, total / 1e3


def markdown(record: dict) -> str:
    """The README table of a result, with the date, versions and load averages it recorded
    ('not recorded' for what an older result lacks)."""
    gpu = record["bench"].endswith("cuda")
    on = (f"{record['device']}, {record['dtype']}" if gpu
          else f"CPU, {record['dtype']}, {record['threads']} threads")
    get = lambda k: "not recorded" if record.get(k) is None else record[k]  # noqa: E731
    before, after = record.get("load_average_before"), record.get("load_average")
    load = (f"load average {before[0]:.2f} before / {after[0]:.2f} after" if before and after
            else "load average not recorded")
    gpu_versions = f", triton {get('triton')}, CUDA {get('cuda')}" if gpu else ""
    lines = [("Smoke run (--quick sizes: checks the script, not figures to quote). "
              if record.get("quick") else "")
             + f"Prefix-tuning training step (forward + backward + AdamW), ours vs PEFT; "
             f"shape {record['shape']}, {on}, {record['timestamp'][:10]}, torch {record['torch']}, "
             f"transformers {get('transformers')}, peft {get('peft')}{gpu_versions}, {load}, "
             f"ours on backend {record['backends'][0]}, median of {record['steps']} steps "
             f"(interleaved). First losses agree: {record['first_losses_agree']}.", "",
             "| provider | median step ms (wall) | speedup vs PEFT | median step ms (CPU time) | "
             "CPU-time speedup | step peak MiB | peak vs PEFT | attention / all ops, ms (profiled step) "
             "| first loss |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        lines.append(f"| {r['provider']} | {r['median_ms']:.0f} | {r['speedup_vs_peft']:.2f}x | "
                     f"{r['median_cpu_ms']:.0f} | {r['cpu_speedup_vs_peft']:.2f}x | "
                     f"{r['peak_MiB']:.1f} | {r['peak_vs_peft']:.2f} | "
                     f"{r['profiled_attention_ms']:.0f} / {r['profiled_total_ms']:.0f} | {r['first_loss']:.5f} |")
    lines += ["", "Wall time is shared with other jobs on this machine; the CPU time of the process "
              "is the less load-sensitive measure. Per-step values are in the JSON file."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--mlp", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--prefix", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 steps (smoke test)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--render", metavar="JSON", help="only rewrite the .md next to a result JSON")
    args = p.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            record = json.load(f)
        with open(os.path.splitext(args.render)[0] + ".md", "w") as f:
            f.write(markdown(record))
        return 0
    load_before = loadavg()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device")
    if args.quick:
        args.hidden, args.layers, args.mlp, args.vocab, args.seq, args.prefix, args.steps = 64, 2, 128, 256, 32, 4, 2

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    providers = {name: synced(step, args.device) for name, step in make_providers(args).items()}
    first = {name: float(step()) for name, step in providers.items()}  # warm-up, same start
    times = {name: [] for name in providers}
    cpu_times = {name: [] for name in providers}
    for _ in range(args.steps):
        for name, step in providers.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    peak_fn = cuda_step_peak_bytes if gpu else step_peak_bytes
    peaks = {name: peak_fn(step) for name, step in providers.items()}
    shares = {name: (float("nan"), float("nan")) if gpu else attention_share(step)
              for name, step in providers.items()}

    base_ms = statistics.median(times["peft"]) * 1e3
    base_cpu = statistics.median(cpu_times["peft"]) * 1e3
    rows = []
    for name in providers:
        ms = statistics.median(times[name]) * 1e3
        cpu_ms = statistics.median(cpu_times[name]) * 1e3
        rows.append({"provider": name, "median_ms": ms, "speedup_vs_peft": base_ms / ms,
                     "median_cpu_ms": cpu_ms, "cpu_speedup_vs_peft": base_cpu / cpu_ms,
                     "step_ms": [t * 1e3 for t in times[name]],
                     "step_cpu_ms": [t * 1e3 for t in cpu_times[name]], "peak_MiB": peaks[name] / MiB,
                     "peak_vs_peft": peaks[name] / peaks["peft"], "first_loss": first[name],
                     "profiled_attention_ms": shares[name][0], "profiled_total_ms": shares[name][1]})
    # fp32: the same numbers up to rounding; bf16: rounding of a whole model in 8 mantissa bits
    agree = abs(first["ours"] - first["peft"]) <= (1e-4 if args.dtype == "fp32" else 2e-2) * abs(first["peft"])
    shape = {k: getattr(args, k) for k in ("hidden", "layers", "heads", "kv_heads", "mlp", "vocab",
                                           "batch", "seq", "prefix")}
    where = torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine()
    record = {"bench": f"train_step_{args.device}", "shape": shape, "steps": args.steps,
              "dtype": str(DTYPES[args.dtype]).replace("torch.", ""), "device": where,
              "threads": torch.get_num_threads(), **versions(),
              "load_average_before": load_before, "load_average": loadavg(),
              "backends": prefix_attn.available_backends(), "cpu": platform.processor() or platform.machine(),
              "first_losses_agree": agree, "timestamp": datetime.datetime.utcnow().isoformat() + "Z",
              "rows": rows, "quick": args.quick}
    os.makedirs(args.out, exist_ok=True)
    name = f"train_{'gpu' if gpu else 'cpu'}" + ("_quick" if args.quick else "")
    if args.threads:
        name += f"_{args.threads}thread"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(record, f, indent=2)
    md = markdown(record)
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(md)
    print(md)
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
