"""`prefix-attn demo`: what the package is for, end to end, with numbers from this machine.

1. checks every available backend against the reference;
2. prefix-tunes a small model on two built-in tasks at once (each row picks its prefix),
   with a progress bar, until the loss has clearly fallen;
3. serves one mixed batch with three prefixes (the two trained ones and a prompt prefix);
4. measures ours against the PEFT path (prefix copied per row, concatenated, dense mask):
   prefill, decode with a shared prefix, one training step, prefix memory.

Without `--model` the base is the built-in tiny Llama over bytes; being random, it is first
trained briefly (all weights) on a mix of the built-in texts so that it is a language model
the prefixes can steer; then it is frozen, and each prefix learns to pick its own text.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, List, Optional

import torch

from . import cli_args, cli_parsers

TASKS = {
    "poet": "roses are red, violets are blue, sugar is sweet, and so are you. ",
    "counter": "one two three four five six seven eight nine ten. ",
}
PROMPT_PREFIX = ("shop", "welcome to the corner shop! today we sell: ")
SHOP_TEXT = "apples, pears, plums. "
CORPUS = list(TASKS.values()) + [PROMPT_PREFIX[1] + SHOP_TEXT]


def _title(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _progress(total: int, desc: str, enabled: bool = True):
    from .progress import progress_bar
    return progress_bar(total, desc, "step", enabled=enabled)


# -- data ------------------------------------------------------------------------------
def _windows(tok, text: str, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """n random windows of `length` tokens from `text` repeated (byte-level or HF tokenizer)."""
    ids = tok.encode(text * (2 + 4 * length // max(1, len(text))), add_special_tokens=False) \
        if not hasattr(tok, "offset") else [b + tok.offset for b in (text * 8).encode()]
    ids = torch.tensor(ids)
    period = max(1, len(ids) - length - 1)
    starts = torch.randint(0, period, (n,), generator=gen)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


# -- 1. backends -----------------------------------------------------------------------
def show_check(device: str) -> bool:
    from .backends import load_errors
    from .check import format_table, nothing_checked, run_checks
    _title("1. every backend against the reference")
    for mod, err in load_errors().items():  # a backend missing here is slow, not wrong, below
        print(f"(not loaded: {mod}: {err})")
    skipped: List[str] = []
    rows = run_checks(device=device, skipped=skipped)
    if not rows:  # nothing passed: not a pass
        print(nothing_checked(skipped))
        return False
    print(format_table(rows))
    return all(r["ok"] for r in rows)


# -- 2. training -----------------------------------------------------------------------
def load_base(model_dir, device: str, pretrain_steps: int, seed: int, progress: bool = True):
    from . import tiny
    if model_dir:  # a broken folder: tiny.ModelFolderError / TokenizerError
        model = tiny.load_model_folder(model_dir)
        return model.to(device).eval(), tiny.load_tokenizer(model_dir)
    tok = tiny.ByteTokenizer()
    model = tiny.default_model(seed=seed, hidden=96, layers=2).to(device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    bar = _progress(pretrain_steps, "pretraining the tiny base (all weights)", progress)
    for _ in range(pretrain_steps):
        ids = torch.cat([_windows(tok, t, 4, 48, gen) for t in CORPUS]).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.update()
    bar.close()
    return model.eval(), tok


def train_prefixes(model, tok, device: str, max_steps: int, num_virtual_tokens: int, seed: int,
                   progress: bool = True):
    from .tuning import prefix_tuning, trainable_parameters
    _title("2. prefix tuning: two tasks trained together, each row with its own prefix")
    for name in TASKS:
        prefix_tuning(model, num_virtual_tokens=num_virtual_tokens, name=name)
    params = trainable_parameters(model)
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    print(f"trainable: {n_train:,} of {n_all:,} parameters ({100 * n_train / n_all:.2f}%); "
          f"the base is frozen")
    opt = torch.optim.AdamW(params, lr=5e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    names = [n for n in TASKS for _ in range(4)]
    model.train()
    first = None
    bar = _progress(max_steps, "prefix tuning", progress)
    t0, tokens = time.perf_counter(), 0
    history = []
    for step in range(max_steps):
        # The base knows every text; the row's prefix must say which one to continue.
        ids = torch.cat([_windows(tok, TASKS[n], 1, 32, gen) for n in names]).to(device)
        loss = model(input_ids=ids, labels=ids, prefixes=names).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
        history.append(loss.item())
        first = history[0] if first is None else first
        rate = tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update()
        recent = statistics.mean(history[-5:])
        if step >= 10 and recent < 0.5 * first:
            bar.total = len(history)  # stopped early on purpose: show a finished bar
            break
    bar.close()
    model.eval()
    recent = statistics.mean(history[-5:])
    print(f"loss {first:.3f} -> {recent:.3f} (mean of the last 5 steps) after {len(history)} steps")
    return first, recent


# -- 3. serving ------------------------------------------------------------------------
def serve_mixed_batch(model, tok, device: str, max_new_tokens: int = 28) -> List[str]:
    from . import tiny
    from .bank import PrefixBank
    _title("3. one batch, three prefixes (two trained, one prompt prefix)")
    bank = PrefixBank.attach(model)
    name, text = PROMPT_PREFIX
    bank.add_prompt(name, torch.tensor(tiny.encode(tok, text)))
    rows = [("poet", "roses"), ("counter", "one two"), (name, "apples")]
    # the prompt entry's KV already holds the start token: its row continues that text, without
    # one (as prefix-attn generate tokenizes it); the other rows start as any text does
    ids, mask = tiny.left_pad([tiny.encode(tok, p, special=bank.kind(n) != "prompt") for n, p in rows],
                              tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             prefixes=[n for n, _ in rows], max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    texts = [tok.decode(r, skip_special_tokens=True) for r in out]
    for (n, p), t in zip(rows, texts):
        print(f"  [{n:>8}] {t!r}")
    print(f"bank: {', '.join(f'{n} ({bank.entry_nbytes(n) / 1024:.1f} KiB)' for n in bank.names())}; "
          f"the KV cache holds only each row's own tokens")
    return texts


# -- 4. benchmarks ---------------------------------------------------------------------
def median_ms(fn: Callable, reps: int) -> float:
    return paired_ms([fn], reps)[0]


def paired_ms(fns: List[Callable], reps: int, bar=None) -> List[float]:
    """Median ms of each function, timed in alternation (one call of each per round, after a
    warm-up of each): a load change on a shared machine then hits every one alike."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
        if bar is not None:
            bar.update(1)
    return [1e3 * statistics.median(t) for t in times]


def _load_note() -> Optional[str]:
    """A note when other work competes for the CPUs (the ratios are then noisy)."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    cores = os.cpu_count() or 1
    if load <= 0.75 * cores:
        return None
    return (f"note: the machine is busy (load average {load:.1f} on {cores} cores): the ratios "
            "below are noisy; rerun on an idle machine for figures to quote")


def _kernel_inputs(B, Hq, Hkv, Sq, Skv, P, D, device, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device).requires_grad_(grad)
    return r(B, Hq, Sq, D), r(B, Hkv, Skv, D), r(B, Hkv, Skv, D), r(Hkv, P, D), r(Hkv, P, D)


def _ours_backend(q, k, v, pk, pv) -> str:
    """The backend prefix_attention picks for these inputs (what "ours" times)."""
    from .backends import choose_backend
    from .validation import normalize
    return choose_backend(normalize(q, k, v, pk, pv)).name


def benchmark(device: str, reps: int = 5, progress: bool = True) -> List[dict]:
    from .api import prefix_attention
    from .baselines import peft_path_attention
    _title("4. ours vs the PEFT path, measured now on this machine")
    rows = []
    note = _load_note()
    if note:
        print(note)
    q, k, v, pk, pv = _kernel_inputs(4, 8, 2, 256, 256, 64, 64, device)
    backend = _ours_backend(q, k, v, pk, pv)
    print(f"ours: the {backend!r} backend")
    if backend == "torch":
        print("note: that is the pure-PyTorch reference backend, slower than the PEFT path: the "
              "fast backends did not load (see section 1, or `prefix-attn check`)")
    bar = _progress(3 * reps, "timing ours and the PEFT path, in alternation", progress)

    def pair(label, shape, ours, base):
        t_ours, t_base = paired_ms([ours, base], reps, bar)
        rows.append(dict(what=label, shape=shape, peft_ms=t_base, ours_ms=t_ours, speedup=t_base / t_ours))

    # prefill: B 4, S 256, P 64, Hq 8 / Hkv 2, D 64 (the inputs above)
    pair("prefill (attention fwd)", "B4 S256 P64 H8/2 D64",
         lambda: prefix_attention(q, k, v, pk, pv), lambda: peft_path_attention(q, k, v, pk, pv))
    # decode with a shared prompt prefix: B 32, Sq 1, own KV 64, P 1024
    q, k, v, pk, pv = _kernel_inputs(32, 8, 2, 1, 64, 1024, 64, device)
    pair("decode, shared prefix", "B32 Sq1 KV64 P1024 H8/2 D64",
         lambda: prefix_attention(q, k, v, pk, pv), lambda: peft_path_attention(q, k, v, pk, pv))
    # one training step of the attention: forward + backward to every input
    q, k, v, pk, pv = _kernel_inputs(4, 8, 2, 256, 256, 64, 64, device, grad=True)
    grad_of = lambda f: (lambda: torch.autograd.grad(f(q, k, v, pk, pv).sum(), (q, k, v, pk, pv)))
    pair("training step (attention fwd+bwd)", "B4 S256 P64 H8/2 D64",
         grad_of(prefix_attention), grad_of(peft_path_attention))
    # prefix memory of a Llama-3-8B-shaped model, P 100, bf16, batch 64, one shared prefix
    from .baselines import peft_path_prefix_bytes
    ours_b = 32 * 2 * 8 * 100 * 128 * 2
    # held: one copy per row in PEFT's cache (its per-layer repeat_kv transient comes on top)
    peft_b = peft_path_prefix_bytes(32, 64, 8, 32, 100, 128, 2, repeat_for_gqa=False)
    bar.close()
    rows.append(dict(what="prefix copies held, B64 (bytes, computed)", shape="L32 Hkv8/Hq32 D128 P100 bf16",
                     peft_ms=float("nan"), ours_ms=float("nan"), speedup=peft_b / ours_b,
                     peft_mib=peft_b / 2 ** 20, ours_mib=ours_b / 2 ** 20))
    print("| what | shape | PEFT path | ours | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "peft_mib" in r:
            print(f"| {r['what']} | {r['shape']} | {r['peft_mib']:.0f} MiB | {r['ours_mib']:.1f} MiB | "
                  f"{r['speedup']:.0f}x less |")
        else:
            print(f"| {r['what']} | {r['shape']} | {r['peft_ms']:.2f} ms | {r['ours_ms']:.2f} ms | "
                  f"{r['speedup']:.2f}x |")
    return rows


# -- CLI -------------------------------------------------------------------------------
def add_parser(subparsers) -> argparse.ArgumentParser:
    return cli_parsers.add_parser(subparsers, "demo", run)


def run(args) -> int:
    device, problem = cli_args.device_problem(args.device)
    if problem is None:
        problem = cli_args.env_problem(device.type, "the demo")
    if problem is not None:
        print(f"prefix-attn demo: error: {problem}", file=sys.stderr)
        return 2
    from . import tiny
    if args.model is not None and not os.path.isdir(args.model):
        print(f"prefix-attn demo: error: {tiny.no_model_folder(args.model)}", file=sys.stderr)
        return 2
    progress = not getattr(args, "no_progress", False)
    torch.manual_seed(args.seed)
    base = None
    try:  # before anything runs: a folder without a usable tokenizer or model is a user error
        tiny.load_tokenizer(args.model)
        if args.model is not None:
            with cli_args.transformers_progress(enabled=progress):
                base = load_base(args.model, args.device, args.pretrain_steps, args.seed, progress)
    except (tiny.TokenizerError, tiny.ModelFolderError) as exc:
        print(f"prefix-attn demo: error: {exc}", file=sys.stderr)
        return 2
    ok = True if args.skip_check else show_check(args.device)
    model, tok = base or load_base(None, args.device, args.pretrain_steps, args.seed, progress)
    first, last = train_prefixes(model, tok, args.device, args.steps, args.virtual_tokens, args.seed,
                                 progress)
    serve_mixed_batch(model, tok, args.device)
    if not args.skip_bench:
        benchmark(args.device, progress=progress)
    print("\ndemo finished" + ("" if ok else " (some backend checks FAILED, see table 1)"))
    return 0 if ok else 1
