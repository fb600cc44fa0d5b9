"""``prefix-attn train``: prefix-tune a local HF model (or the built-in tiny one) on a text file.

Data: a ``.jsonl`` file whose lines are ``{"text": ...}`` (loss on every token) or
``{"prompt": ..., "completion": ...}`` (loss on the completion only), or a plain text file
with one example per non-empty line. The model is a local folder (``--model``; its tokenizer,
else a byte-level one) or the built-in tiny Llama with a byte tokenizer (saved to
``OUT/base_model`` so the adapter can be used later).

Training runs on the fused path (``prefix_attn.prefix_tuning``): the base stays frozen, one
prefix ``--name`` learns. A tqdm bar shows tokens/s and the loss; the held-out loss is computed
every ``--eval-every`` steps and logged to ``OUT/log.jsonl``. ``OUT/checkpoint.pt`` (prefix,
optimizer, step, RNG) is written atomically every ``--save-every`` steps (temporary file +
``os.replace``), and ``--resume`` continues from it, giving the same result as an
uninterrupted run. The result is ``OUT/adapter`` in PEFT's format
(``peft.PeftModel.from_pretrained(base, OUT/adapter)`` loads it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from . import atomic

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter"
BASE_MODEL = "base_model"
LOG = "log.jsonl"


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def read_examples(path: str) -> List[Tuple[str, str]]:
    """[(prompt, completion)] from a JSONL or text file (``("", text)`` for plain text)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.endswith(".jsonl"):
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not JSON ({exc})") from None
                if "text" in obj:
                    examples.append(("", str(obj["text"])))
                elif "completion" in obj:
                    examples.append((str(obj.get("prompt", "")), str(obj["completion"])))
                else:
                    raise ValueError(f"{path}:{n}: expected a 'text' or 'prompt'/'completion' field")
            else:
                examples.append(("", line))
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def _encode(tokenizer, text: str, special: bool) -> List[int]:
    """Token ids of ``text``; ``special``: with the tokenizer's start token (bos)."""
    if hasattr(tokenizer, "offset"):  # ByteTokenizer
        ids = tokenizer.encode(text)
        return ids if special or not tokenizer.add_bos else ids[1:]
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def tokenize(tokenizer, examples, max_length: int) -> List[Tuple[List[int], List[int]]]:
    """[(ids, labels)] with labels -100 on the prompt, eos appended, truncated to ``max_length``."""
    out = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for prompt, completion in examples:
        p = _encode(tokenizer, prompt, special=True) if prompt else []
        c = _encode(tokenizer, completion, special=not prompt)
        if eos is not None:
            c = c + [eos]
        ids = (p + c)[:max_length]
        labels = ([-100] * len(p) + c)[:max_length]
        if len(ids) >= 2:
            out.append((ids, labels))
    return out


def collate(rows: Sequence[Tuple[List[int], List[int]]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` LongTensors ``[B, S]``."""
    S = max(len(ids) for ids, _ in rows)
    B = len(rows)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for b, (i, l) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i)
        mask[b, :len(i)] = 1
        labels[b, :len(l)] = torch.tensor(l)
    return ids, mask, labels


def collate_packed(rows: Sequence[Tuple[List[int], List[int]]]):
    """The rows packed into one sequence without padding: ``input_ids``, ``position_ids``
    (restarting at every example, which is how transformers finds the packed sequences) and
    ``labels`` ``[1, T]``, the first label of every example -100 (no prediction across
    examples). The loss is the padded batch's: the same tokens are predicted."""
    ids, pos, labels = [], [], []
    for i, l in rows:
        ids += i
        pos += range(len(i))
        labels += [-100] + list(l[1:])
    return (torch.tensor([ids]), torch.tensor([pos]), torch.tensor([labels]))


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> List[List[int]]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees
    the same batches as an uninterrupted one."""
    perm = random.Random(seed * 1_000_003 + epoch).sample(range(n), n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
def load_model(model_dir: Optional[str], out_dir: str, seed: int):
    """(model, tokenizer, model_dir_for_the_adapter) with ``attn_implementation="prefix_attn"``."""
    from prefix_attn import tiny

    if model_dir is None:
        base_dir = os.path.join(out_dir, BASE_MODEL)
        if os.path.isdir(base_dir):  # resuming: the same random base
            return load_model(base_dir, out_dir, seed)
        model = tiny.default_model(seed=seed)
        tokenizer = tiny.ByteTokenizer()
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        return model, tokenizer, base_dir
    import prefix_attn.hf  # noqa: F401  (registers "prefix_attn")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="prefix_attn",
                                                 local_files_only=True)
    return model, tiny.load_tokenizer(model_dir), model_dir


def evaluate(model, data, batch_size: int, pad_id: int, name: str) -> float:
    """Mean token loss over ``data`` (no grad)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            ids, mask, labels = collate(data[i:i + batch_size], pad_id)
            logits = model(ids, attention_mask=mask, prefixes=[name] * len(ids)).logits
            tgt = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(),
                                                    tgt, ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((tgt != -100).sum())
    model.train(was)
    return total / max(count, 1)


def _log(out_dir: str, record: dict) -> None:
    with open(os.path.join(out_dir, LOG), "a") as f:
        f.write(json.dumps(record) + "\n")


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("data", help="training data: .jsonl ({'text'} or {'prompt','completion'}) or text")
    p.add_argument("--output", "-o", required=True, help="output folder (checkpoint, log, adapter)")
    p.add_argument("--model", default=None, help="local HF model folder (default: built-in tiny Llama)")
    p.add_argument("--eval-data", default=None, help="held-out file (default: --eval-fraction of data)")
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--name", default="default", help="prefix name (the bank entry)")
    p.add_argument("--num-virtual-tokens", type=int, default=20)
    p.add_argument("--projection-hidden-size", type=int, default=None,
                   help="train through an MLP reparameterisation (folded at save)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--pack", action="store_true",
                   help="pack each batch into one row without padding (same loss, no padded tokens)")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand (``func`` set) to the ``prefix-attn`` parser."""
    p = subparsers.add_parser("train", help="prefix-tune a model on a text/JSONL file",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` says; returns 0. Writes OUTPUT/{checkpoint.pt, log.jsonl, adapter/}."""
    from .progress import progress_bar

    from prefix_attn.tuning import enable_checkpointing, prefix_tuning

    os.makedirs(args.output, exist_ok=True)
    ckpt_path = os.path.join(args.output, CHECKPOINT)
    state = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        state = torch.load(ckpt_path, weights_only=False)
    elif os.path.isfile(ckpt_path):
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue, or another --output")

    torch.manual_seed(args.seed)
    model, tokenizer, model_dir = load_model(args.model, args.output, args.seed)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    data = tokenize(tokenizer, read_examples(args.data), args.max_length)
    if args.eval_data:
        eval_data = tokenize(tokenizer, read_examples(args.eval_data), args.max_length)
    else:
        n_eval = int(len(data) * args.eval_fraction)
        order = random.Random(args.seed).sample(range(len(data)), len(data))
        eval_data = [data[i] for i in order[:n_eval]]
        data = [data[i] for i in order[n_eval:]]
    if not data:
        raise ValueError("no training examples left (too short, or all held out)")

    module = prefix_tuning(model, num_virtual_tokens=args.num_virtual_tokens,
                           projection_hidden_size=args.projection_hidden_size, name=args.name)
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    step = 0
    if state is not None:
        module.load_state_dict(state["prefix"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])

    def save_checkpoint():
        atomic.save_torch({"step": step, "prefix": module.state_dict(), "optimizer": opt.state_dict(),
                      "torch_rng": torch.get_rng_state(), "args": vars(args)}, ckpt_path)

    model.train()
    bar = progress_bar(total, "prefix tuning", "step", enabled=not args.no_progress, initial=step)
    t0, tokens = time.perf_counter(), 0
    loss_value = float("nan")
    while step < total:
        epoch, index = divmod(step, steps_per_epoch)
        batch = [data[i] for i in batch_order(len(data), args.batch_size, args.seed, epoch)[index]]
        if args.pack:
            ids, pos, labels = collate_packed(batch)
            loss = model(ids, position_ids=pos, labels=labels, prefixes=[args.name],
                         use_cache=False).loss
            n_tokens = ids.numel()
        else:
            ids, mask, labels = collate(batch, pad_id)
            loss = model(ids, attention_mask=mask, labels=labels,
                         prefixes=[args.name] * len(batch)).loss
            n_tokens = int(mask.sum())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        loss_value = loss.item()
        tokens += n_tokens
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        record = {"step": step, "loss": loss_value, "tokens_per_s": rate}
        if eval_data and (step % args.eval_every == 0 or step == total):
            record["eval_loss"] = evaluate(model, eval_data, args.batch_size, pad_id, args.name)
            bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}")
        _log(args.output, record)
        if step % args.save_every == 0 or step == total:
            save_checkpoint()
    bar.close()
    adapter_dir = os.path.join(args.output, ADAPTER)
    model.prefix_bank.save_peft(args.name, adapter_dir)
    if model_dir is not None:  # so that PEFT finds the base model
        cfg_path = os.path.join(adapter_dir, "adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = os.path.abspath(model_dir)
        atomic.write_text(cfg_path, json.dumps(cfg, indent=2))
    print(f"trained {step} steps, last loss {loss_value:.4f}; adapter (PEFT format): {adapter_dir}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``prefix-attn train ...`` as a function: ``main(["data.jsonl", "-o", "out"])``."""
    parser = add_arguments(argparse.ArgumentParser(prog="prefix-attn train", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
