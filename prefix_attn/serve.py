"""``prefix-attn generate``: answer a JSONL file of requests, each with its own prefix, in batches.

Input, one JSON object per line (blank lines skipped)::

    {"id": "r1", "prefix": "support", "prompt": "How do I ...?"}
    {"prompt": "no prefix for this one"}            # "prefix" missing / null / "" = no prefix

Output, one line per request in input order::

    {"id": "r1", "prefix": "support", "prompt": "How do I ...?", "completion": "...", "num_tokens": 17}

The model is a local folder (``--model``; its tokenizer, else bytes) or the built-in tiny default
(:func:`prefix_attn.tiny.default_model`, random weights: for smoke tests). Prefixes come from a
saved bank (``--bank DIR``), PEFT prefix-tuning adapters (``--adapter NAME=DIR``) and shared
prompts (``--prompt-prefix NAME=TEXT``: the KV of TEXT computed once). Requests using a prompt
prefix (from ``--prompt-prefix`` or a saved bank's ``add_prompt`` entries) are tokenised
without the special start token, which the prompt already carries. A batch mixes
prefixes freely: ``model.generate(..., prefixes=[...])`` reads each row's prefix from the bank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch

from . import atomic

__all__ = ["main", "add_parser", "Request", "read_requests", "RequestError"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class RequestError(ValueError):
    """A bad request file or request (names the file and line)."""


@dataclass
class Request:
    """One line of the request file."""

    prompt: str
    prefix: Optional[str] = None
    id: Any = None
    line: int = 0
    extra: dict = field(default_factory=dict)


def read_requests(path: str) -> List[Request]:
    """Parse a JSONL request file (``-`` = stdin). Raises RequestError naming ``path:line``."""
    stream = sys.stdin if path == "-" else None
    try:
        f = stream or open(path, "r", encoding="utf-8")
    except OSError as exc:
        raise RequestError(f"cannot read requests file {path!r}: {exc.strerror}") from exc
    requests = []
    with f if stream is None else _nullcontext(f):
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RequestError(f"{where}: invalid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise RequestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                raise RequestError(f"{where}: 'prompt' must be a string, got {prompt!r}")
            prefix = obj.get("prefix")
            if prefix == "":
                prefix = None
            if prefix is not None and not isinstance(prefix, str):
                raise RequestError(f"{where}: 'prefix' must be a name (string) or null, got {prefix!r}")
            extra = {k: v for k, v in obj.items() if k not in ("prompt", "prefix", "id")}
            requests.append(Request(prompt=prompt, prefix=prefix, id=obj.get("id", len(requests)),
                                    line=lineno, extra=extra))
    return requests


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


def _name_dir(spec: str, option: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name or not value:
        raise RequestError(f"{option} expects NAME=VALUE, got {spec!r}")
    return name, value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser("generate", help="answer a JSONL file of requests with per-row prefixes",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF model folder (default: the built-in tiny model)")
    p.add_argument("--bank", default=None, help="a folder written by PrefixBank.save")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT prefix-tuning adapter folder, served as prefix NAME (repeatable)")
    p.add_argument("--prompt-prefix", action="append", default=[], metavar="NAME=TEXT",
                   help="a shared prompt whose KV is computed once and served as prefix NAME (repeatable)")
    p.add_argument("--input", "-i", required=True, help="JSONL requests file ('-' = stdin)")
    p.add_argument("--output", "-o", required=True, help="JSONL results file ('-' = stdout)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _load_model(model_dir: Optional[str], device: str, dtype: torch.dtype):
    from prefix_attn import hf, tiny

    hf.register()
    if model_dir is None:
        model = tiny.default_model().to(dtype)
    else:
        if not os.path.isdir(model_dir):
            raise RequestError(f"model folder not found: {model_dir!r}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=hf.ATTN_NAME,
                                                     dtype=dtype, local_files_only=True)
    model = model.to(device).eval()
    if model.config._attn_implementation != hf.ATTN_NAME:
        model.set_attn_implementation(hf.ATTN_NAME)
    return model, tiny.load_tokenizer(model_dir)


def _encode(tokenizer, text: str, special: bool) -> List[int]:
    """Token ids of ``text``; ``special=False`` drops the start token (after a prompt prefix)."""
    from prefix_attn.tiny import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        ids = tokenizer.encode(text)
        return ids if special or not tokenizer.add_bos else ids[1:]
    return list(tokenizer.encode(text, add_special_tokens=special))


def _left_pad(rows: List[List[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, S]``, padded on the left (decoder-only generate)."""
    S = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, S - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, S - len(r):] = 1
    return ids, mask


def _progress(total: int, enabled: bool):
    from .progress import progress_bar
    return progress_bar(total, "generate", "req", enabled=enabled)


class _Output:
    """Writes result lines to a temporary file and moves it into place at the end (atomic)."""

    def __init__(self, path: str):
        self.path = path
        if path == "-":
            self.f, self.tmp = sys.stdout, None
        else:
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            self._file = atomic.Replacement(path, suffix=".jsonl")
            self.tmp = self._file.tmp
            self.f = open(self.tmp, "w", encoding="utf-8")

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def commit(self) -> None:
        if self.tmp is not None:
            self.f.close()
            self._file.commit()
        else:
            self.f.flush()

    def abort(self) -> None:
        if self.tmp is not None:
            self.f.close()
            self._file.abort()


def run(args: argparse.Namespace) -> int:
    """Run ``generate`` from parsed arguments; returns the exit code (2 on a user error)."""
    try:
        return _run(args)
    except (RequestError, KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"prefix-attn generate: error: {msg}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from prefix_attn.bank import PrefixBank

    if args.batch_size < 1:
        raise RequestError(f"--batch-size must be >= 1, got {args.batch_size}")
    adapters = [_name_dir(s, "--adapter") for s in args.adapter]
    prompt_prefixes = [_name_dir(s, "--prompt-prefix") for s in args.prompt_prefix]
    requests = read_requests(args.input)

    torch.manual_seed(args.seed)
    model, tokenizer = _load_model(args.model, args.device, _DTYPES[args.dtype])
    bank = PrefixBank.load(args.bank, model) if args.bank else PrefixBank.attach(model)
    for name, directory in adapters:
        bank.load_peft(name, directory)
    for name, text in prompt_prefixes:
        bank.add_prompt(name, torch.tensor(_encode(tokenizer, text, special=True)))
    prompt_names = {name for name in bank.names() if bank.kind(name) == "prompt"}
    known = set(bank.names())
    for r in requests:  # every name checked before any generation
        if r.prefix is not None and r.prefix not in known:
            raise RequestError(f"{args.input}:{r.line}: unknown prefix {r.prefix!r}; known prefixes: {bank.names()}")

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_id = tokenizer.eos_token_id
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, num_beams=args.num_beams,
                      pad_token_id=pad_id, eos_token_id=eos_id)
    if args.do_sample:
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p)

    out = _Output(args.output)
    bar = _progress(len(requests), enabled=not args.no_progress)
    try:
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start:start + args.batch_size]
            rows = [_encode(tokenizer, r.prompt, special=r.prefix not in prompt_names) for r in batch]
            ids, mask = _left_pad(rows, pad_id)
            with torch.no_grad():
                gen = model.generate(ids.to(args.device), attention_mask=mask.to(args.device),
                                     prefixes=[r.prefix for r in batch], **gen_kwargs)
            for r, new in zip(batch, gen[:, ids.shape[1]:].tolist()):
                if eos_id is not None and eos_id in new:
                    new = new[:new.index(eos_id)]
                new = [t for t in new if t != pad_id]
                result = {"id": r.id, "prefix": r.prefix, "prompt": r.prompt,
                          "completion": tokenizer.decode(new, skip_special_tokens=True), "num_tokens": len(new)}
                result.update({k: v for k, v in r.extra.items() if k not in result})  # echo unknown fields
                out.write(result)
            bar.update(len(batch))
    except BaseException:
        out.abort()
        raise
    finally:
        bar.close()
    out.commit()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``prefix-attn generate`` (``argv`` without the subcommand name)."""
    parser = argparse.ArgumentParser(prog="prefix-attn generate", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
