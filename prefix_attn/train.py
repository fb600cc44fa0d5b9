"""``prefix-attn train``: prefix-tune a local HF model (or the built-in tiny one) on a text file.

Data: JSON (a ``.jsonl`` or ``.json`` file, any case) with one object per line, or a ``.json``
file holding one array of objects; each object is ``{"text": ...}`` (loss on every token) or
``{"prompt": ..., "completion": ...}`` (loss on the completion only; ``prompt`` optional), the
values strings. Any other file is plain UTF-8 text with one example per non-empty line. An
example is cut to ``--max-length`` tokens; one left with no token to learn (its prompt fills
``--max-length``) is dropped, with one warning giving the count. The model is a local folder
(``--model``, with its tokenizer files: a folder without them is an error) or the built-in tiny
Llama with a byte tokenizer, its random weights drawn from ``--seed`` and saved with the byte
tokenizer to ``OUT/base_model`` in float32, then loaded back from there in ``--dtype`` as
``--resume`` loads it (pass ``--model OUT/base_model`` to ``prefix-attn generate``).

Training runs on the fused path (``prefix_attn.prefix_tuning``) on ``--device`` (default: the
CPU): the base stays frozen, in ``--dtype``, and one float32 prefix ``--name`` learns, for
``--max-steps`` steps (the data cycled as needed; default: ``--epochs`` passes). A tqdm bar
shows tokens/s and the loss; the held-out loss is computed every ``--eval-every`` steps and
logged to ``OUT/log.jsonl``. ``OUT/checkpoint.pt`` (prefix,
optimizer, step, RNG, settings) is written atomically every ``--save-every`` steps and at the
end, and ``--resume`` continues from it, giving the same result as an uninterrupted run: it
refuses settings that would change that result (data, model, batch size, seed, ...), and cuts
the log back to the checkpoint's step. Ctrl-C (SIGINT) or SIGTERM stops after the current step
with a checkpoint of it (exit status 130 / 143); a second one stops at once. The result is
``OUT/adapter`` in PEFT's format (``peft.PeftModel.from_pretrained(base, OUT/adapter)`` loads it).

``--chat`` trains a prefix for ``prefix-attn generate --chat`` (an instruct model): each
example is rendered with the tokenizer's chat template, ``{"prompt", "completion"}`` as the
conversation [user, assistant], ``{"messages": [...]}`` as given (a request's messages, then
the assistant message learnt); the loss is on that last assistant turn only (its end-of-turn
tokens included), and the tokens before it must be those generate --chat feeds (checked; a
template or example where they are not is refused). ``{"text"}`` and plain text are refused.

Errors in the data or options are reported as ``prefix-attn train: error: ...`` (exit status
2) before anything is written. A loss (or eval loss) that is not finite stops the run with an
error naming the step (exit status 1): that step is neither logged nor saved, and the last
checkpoint stays. ``OUT/log.jsonl`` is strict JSON (never a bare NaN).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from typing import List, Optional, Sequence, Tuple

import torch

from . import atomic, cli_args, cli_parsers, jsonl, tiny, train_chat
from .backends import check_env_backend
from .train_state import (BASE_MODEL, LOG, PROG, Interrupted, StopSignals, TrainError, TrainingFailed, append_log,
                          check_output_folder, check_same_settings, create_output_folder,
                          load_checkpoint, plain_args, run_settings, start_log, warn)

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter"
DEFAULT_MAX_LENGTH = cli_parsers.DEFAULT_MAX_LENGTH
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype: the frozen base's


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def read_examples(path: str, what: str = "data file") -> List[Tuple[str, str]]:
    """[(prompt, completion)] from a JSON or text file (``("", text)`` for plain text and for
    ``{"text": ...}``). Raises :class:`TrainError` naming ``path:line`` on bad data."""
    return [(prompt, completion) for _, prompt, completion in read_examples_at(path, what)]


def read_examples_at(path: str, what: str = "data file") -> List[Tuple[str, str, str]]:
    """[(where, prompt, completion)] as :func:`read_examples`, ``where`` naming each example in
    messages (``path:line``, and the index of an item of a ``.json`` array); ``what`` names the
    file in "not found" messages."""
    lines = jsonl.read_lines(path, TrainError, what=what)
    if jsonl.is_json_path(path):
        examples = [(where, *_example(where, obj))
                    for where, obj in jsonl.json_records(path, lines, TrainError, arrays=True)]
    else:
        examples = [(f"{path}:{n}", "", line) for n, line in lines if line.strip()]
        if examples and all(_looks_like_json_object(text) for _, _, text in examples):
            warn("warning", f"{path}: every line looks like a JSON object, but only .jsonl / .json "
                            "files are read as JSON: this one trains on the raw lines, braces and "
                            "field names included (rename it to .jsonl to read its fields)")
    if not examples:
        raise TrainError(f"{path}: no examples (the file is empty or has only blank lines)")
    return examples


def _looks_like_json_object(line: str) -> bool:
    line = line.strip()
    if not (line.startswith("{") and line.endswith("}")):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _example(where: str, obj) -> Tuple[str, str]:
    """(prompt, completion) of one JSON item (``where`` = ``path:line`` for the messages)."""
    if not isinstance(obj, dict):
        raise TrainError(f"{where}: expected a JSON object, got {jsonl.json_type(obj)}"
                         + jsonl.array_hint(where, obj))
    if "tools" in obj:  # not to be dropped silently
        raise TrainError(f"{where}: 'tools' needs --chat (the tokenizer's chat template renders them)")
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise TrainError(f"{where}: give either 'text' or 'prompt'/'completion', not both")
        return "", _string_field(where, obj, "text")
    if "completion" in obj:
        prompt = _string_field(where, obj, "prompt") if "prompt" in obj else ""
        return prompt, _string_field(where, obj, "completion")
    if "messages" in obj:
        raise TrainError(f"{where}: 'messages' needs --chat (the tokenizer's chat template renders them)")
    found = ", ".join(repr(k) for k in obj) or "none"
    raise TrainError(f"{where}: expected a 'text' field, or 'completion' (with an optional 'prompt'); "
                     f"fields found: {found}")


def _string_field(where: str, obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise TrainError(f"{where}: field {key!r} must be a string, got {jsonl.json_type(value)}")
    return value


def encode_example(tokenizer, prompt: str, completion: str) -> Tuple[List[int], List[int]]:
    """(ids, labels) of one example, untruncated: labels -100 on the prompt, eos appended."""
    eos = getattr(tokenizer, "eos_token_id", None)
    p = tiny.encode(tokenizer, prompt, special=True) if prompt else []
    c = tiny.encode(tokenizer, completion, special=not prompt)
    if eos is not None:
        c = c + [eos]
    return p + c, [-100] * len(p) + c


def has_target(labels: Sequence[int]) -> bool:
    """Whether a row has a token to learn: a label other than -100 after the first position
    (the first token is never predicted)."""
    return any(label != -100 for label in labels[1:])


def prepare(tokenizer, examples_at: Sequence[Tuple[str, str, str]], max_length: int,
            vocab_size: int, path: str, what: str = "data file",
            chat: Optional[train_chat.ChatExamples] = None) -> List[Tuple[List[int], List[int]]]:
    """(ids, labels) rows of ``read_examples_at``'s examples of ``path`` (:func:`encode_example`;
    with ``chat``, its rows of ``train_chat.read_examples_at``'s conversations), truncated to
    ``max_length``, checked: a token id
    outside the model's ``vocab_size`` is a :class:`TrainError` naming the example; examples left
    with no token to learn (the prompt fills ``max_length``, or under two tokens) are dropped
    with one warning giving their count and cause, and an error when none is left. An example
    with neither prompt nor text (``{"text": ""}``, blanks only) is dropped too, as a blank line
    of a text file is: it would teach the model to end every text at once."""
    out, cut, short, blank, shortened = [], 0, 0, 0, 0
    rows = chat.rows(examples_at) if chat is not None else [
        (where, encode_example(tokenizer, p, c) if p or c.strip() else None) for where, p, c in examples_at]
    for where, row in rows:
        if row is None:
            blank += 1
            continue
        ids, labels = row
        problem = tiny.vocab_problem(tokenizer, ids, vocab_size)
        if problem is not None:
            raise TrainError(f"{where}: {problem}")
        if has_target(labels[:max_length]):
            out.append((ids[:max_length], labels[:max_length]))
            shortened += len(ids) > max_length and has_target(labels[max_length:])
        elif has_target(labels):
            cut += 1
        else:
            short += 1
    if shortened:  # kept, but the end of their answer (the end-of-text / end-of-turn) is not learnt
        warn("note", f"{path}: {shortened} of {len(examples_at)} example{'' if len(examples_at) == 1 else 's'} "
                     f"{'is' if shortened == 1 else 'are'} longer than the {max_length}-token limit per "
                     f"example (--max-length): cut, so the end of {'its' if shortened == 1 else 'their'} "
                     f"completion, and the end-of-text or end-of-turn token after it, is not learnt")
    if cut or short or blank:
        causes = []
        if blank:
            causes.append(f"{blank} {'is' if blank == 1 else 'are'} empty (no text, or blanks only)")
        if cut:
            causes.append(f"in {cut} the prompt fills the {max_length}-token limit per example "
                          f"(--max-length, at most the model's positions less --num-virtual-tokens) "
                          f"and truncation cuts off the whole completion (raise --max-length if the "
                          f"model allows, or shorten the prompts)")
        if short:
            causes.append(f"{short} {'is' if short == 1 else 'are'} under two tokens (nothing to predict)")
        dropped = cut + short + blank
        summary = (f"{path}: {dropped} of {len(examples_at)} example{'' if len(examples_at) == 1 else 's'} "
                   f"{'has' if dropped == 1 else 'have'} no token to learn: " + "; ".join(causes))
        if not out:
            raise TrainError(f"{summary}; no example of the {what} is left to train on"
                             if what == "data file" else f"{summary}; no example of the {what} is left")
        warn("warning", f"{summary}; dropped")
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


def split_eval(data: list, fraction: float, seed: int) -> Tuple[list, list]:
    """(train, eval): ``int(len(data) * fraction)`` examples held out, chosen by ``seed``; warns
    once when that rounds to none."""
    n_eval = int(len(data) * fraction)
    if fraction > 0 and n_eval == 0:
        warn("warning", f"eval set empty: {len(data)} example{'' if len(data) == 1 else 's'} x {fraction} "
                         f"< 1; no eval loss will be logged (pass --eval-data, or a larger --eval-fraction)")
    order = random.Random(seed).sample(range(len(data)), len(data))
    return [data[i] for i in order[n_eval:]], [data[i] for i in order[:n_eval]]


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
def load_model(model_dir: Optional[str], out_dir: str, seed: int, resume: bool = False,
               dtype: torch.dtype = torch.float32):
    """(model, tokenizer, model_dir_for_the_adapter, base_to_save) with
    ``attn_implementation="prefix_attn"``, on the CPU. Without ``model_dir``: the built-in tiny
    model drawn from ``seed`` in float32 (``base_to_save``: it goes to ``OUT/base_model`` once
    the run is checked, to be loaded back from there in ``dtype``), or the one a resumed run
    saved there; a folder loads in ``dtype``. Nothing is written here."""
    base_dir = os.path.join(out_dir, BASE_MODEL)
    if model_dir is None:
        if resume and os.path.isdir(base_dir):  # the same random base
            return (*load_model(base_dir, out_dir, seed, dtype=dtype)[:3], False)
        return tiny.default_model(seed=seed), tiny.ByteTokenizer(), base_dir, True
    if not os.path.isdir(model_dir):
        raise TrainError(tiny.no_model_folder(model_dir))
    try:  # first: a folder without its tokenizer is refused before the model loads
        tokenizer = tiny.load_tokenizer(model_dir)
        model = tiny.load_model_folder(model_dir, dtype=dtype)
    except (tiny.TokenizerError, tiny.ModelFolderError) as exc:
        raise TrainError(str(exc)) from None
    return model, tokenizer, model_dir, False


def save_base_model(model, tokenizer, base_dir: str) -> None:
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    atomic.readable_by_others(base_dir)


def effective_max_length(requested: Optional[int], config, num_virtual_tokens: int) -> int:
    """The tokens per example that fit: the tokens after a prefix are numbered from its length
    (PEFT's convention), so at most the model's positions less ``num_virtual_tokens``
    (``requested``, default 256, is clamped to that with a notice when given larger)."""
    wanted = DEFAULT_MAX_LENGTH if requested is None else requested
    positions = cli_args.max_positions(config)
    if positions is None:
        return wanted
    room = positions - num_virtual_tokens
    if room < 2:
        raise TrainError(f"the model numbers {positions} positions: {num_virtual_tokens} virtual tokens "
                         f"leave {room} for the text (at least 2 needed); use fewer --num-virtual-tokens")
    if wanted <= room:
        return wanted
    if requested is not None:
        warn("note", f"--max-length {requested} lowered to {room}: the model numbers {positions} "
                      f"positions and the prefix takes {num_virtual_tokens}")
    return room


def evaluate(model, data, batch_size: int, pad_id: int, name: str,
             device: Optional[torch.device] = None) -> float:
    """Mean token loss over ``data`` (no grad)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            ids, mask, labels = (t.to(device) for t in collate(data[i:i + batch_size], pad_id))
            logits = model(ids, attention_mask=mask, prefixes=[name] * len(ids)).logits
            tgt = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(),
                                                    tgt, ignore_index=-100, reduction="sum")
            total += nll.item()
            count += int((tgt != -100).sum())
    model.train(was)
    return total / max(count, 1)


def train_step(model, opt, batch, pad_id: int, name: str, pack: bool,
               device: Optional[torch.device] = None) -> Tuple[float, int]:
    """One optimizer step on ``batch``: (loss, tokens in the batch)."""
    if pack:
        ids, pos, labels = (t.to(device) for t in collate_packed(batch))
        loss = model(ids, position_ids=pos, labels=labels, prefixes=[name], use_cache=False).loss
        n_tokens = ids.numel()
    else:
        ids, mask, labels = (t.to(device) for t in collate(batch, pad_id))
        loss = model(ids, attention_mask=mask, labels=labels, prefixes=[name] * len(batch)).loss
        n_tokens = int(mask.sum())
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:  # else nothing reached the prefix: the caller's check says so
        loss.backward()
        opt.step()
    return loss.item(), n_tokens


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return cli_parsers.train_arguments(p)


_prefix_name = cli_parsers.prefix_name


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=PROG, description=__doc__,
                                                 formatter_class=cli_args.HelpFormatter))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand (``func`` set) to the ``prefix-attn`` parser."""
    return cli_parsers.add_parser(subparsers, "train", run)


def _check_takes_a_bank(model, folder) -> None:
    """Refuse a model that prefix_tuning would refuse (BART-style decoders, layers of different
    head dims, ...) as a usage error before anything is written (it raised mid-run, leaving
    an output folder with a log)."""
    from . import hf

    why = hf.unsupported_model(model)  # its dims included (layers of different head dims)
    if why is not None:
        raise TrainError(f"--model {folder}: cannot prefix-tune this model: {why}")


def run(args: argparse.Namespace) -> int:
    """Train as ``args`` says. Returns 0; 2 on a user error (message on stderr, nothing
    written); 1 when the loss stops being finite (the step named, nothing of it saved); 130 / 143 when SIGINT / SIGTERM stopped it (a checkpoint of the last step saved)."""
    signals = StopSignals()
    try:
        with cli_args.transformers_progress(enabled=not args.no_progress), signals:
            return _train(args, signals)
    except TrainError as exc:
        warn("error", str(exc))
        return 2
    except TrainingFailed as exc:
        warn("error", str(exc))
        return 1
    except Interrupted as stop:
        warn("stopped", f"{signal.Signals(stop.signum).name}: {stop.note}")
        return 128 + stop.signum
    except Exception as exc:  # out of memory while the run was set up (the steps say theirs)
        reason = out_of_memory(exc)
        if reason is None:
            raise
        warn("error", f"out of memory while setting up the run ({reason}); {signals.note}; lower "
                      "--projection-hidden-size or --num-virtual-tokens, or use --dtype bfloat16")
        return 1


def out_of_memory(exc: BaseException) -> Optional[str]:
    """What an out-of-memory error says (CUDA's, or the CPU allocator's RuntimeError), shortened
    to a line; None for any other error."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    text = str(exc).strip()
    if not (isinstance(exc, (oom, MemoryError))
            or (isinstance(exc, RuntimeError) and "can't allocate memory" in text)):
        return None
    line = (text.splitlines() or [type(exc).__name__])[0]
    line = line[line.find("DefaultCPUAllocator: ") + len("DefaultCPUAllocator: "):] \
        if "DefaultCPUAllocator: " in line else line
    return line if len(line) <= 160 else line[:157] + "..."


def _train(args: argparse.Namespace, signals: StopSignals) -> int:
    from prefix_attn.tuning import enable_checkpointing, prefix_tuning

    from .progress import progress_bar

    # everything is checked before the output folder is written
    for option, path in (("data", args.data), ("--eval-data", args.eval_data)):
        if path == "-":  # the checkpoint records the file's content, which --resume checks
            raise TrainError(f"{option}: train reads a file, not standard input (-): save it to a "
                             "file first")
    check_output_folder(args.output, files=(CHECKPOINT, LOG), folders=(ADAPTER, BASE_MODEL))
    device = training_device(args.device)
    dtype = DTYPES[args.dtype]
    try:
        check_env_backend(device.type, "training")
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    read = train_chat.read_examples_at if args.chat else read_examples_at
    examples = read(args.data)
    eval_examples = read(args.eval_data, what="--eval-data file") if args.eval_data else None
    chat = train_chat.ChatExamples.of_model(args.model) if args.chat else None  # before the model loads
    ckpt_path = os.path.join(args.output, CHECKPOINT)
    if args.resume:
        state = load_checkpoint(ckpt_path)
        signals.note = resume_note(state["step"], ckpt_path)
    elif os.path.isfile(ckpt_path):
        raise TrainError(f"{ckpt_path} exists: pass --resume to continue, or choose another --output")
    else:
        state = None

    torch.manual_seed(args.seed)
    model, tokenizer, model_dir, base_to_save = load_model(args.model, args.output, args.seed,
                                                           resume=state is not None, dtype=dtype)
    _check_takes_a_bank(model, args.model)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    max_length = effective_max_length(args.max_length, model.config, args.num_virtual_tokens)
    vocab_size = model.get_input_embeddings().num_embeddings
    data = prepare(tokenizer, examples, max_length, vocab_size, args.data, chat=chat)
    if eval_examples is not None:
        eval_data = prepare(tokenizer, eval_examples, max_length, vocab_size, args.eval_data,
                            what="--eval-data file", chat=chat)
    elif args.eval_every == 0:  # no eval: nothing is held out, every example trains
        eval_data = []
    else:
        data, eval_data = split_eval(data, args.eval_fraction, args.seed)
    if not data:
        raise TrainError("no training examples left (all held out: pass a smaller --eval-fraction)")
    settings = run_settings(args, max_length)
    if state is not None:
        check_same_settings(state, settings, ckpt_path)

    create_output_folder(args.output)
    if base_to_save:
        save_base_model(model, tokenizer, model_dir)  # float32, as drawn
        # then loaded back in dtype as a resumed run (and generate --model OUT/base_model) loads
        # it: from_pretrained keeps what transformers keeps in float32 (RoPE's inv_freq), which
        # model.to(dtype) would round
        model = load_model(model_dir, args.output, args.seed, dtype=dtype)[0]
    model.to(device)  # before the prefix: it is made on the model's device
    start_log(args.output, state["step"] if state is not None else None)

    module = prefix_tuning(model, num_virtual_tokens=args.num_virtual_tokens,
                           projection_hidden_size=args.projection_hidden_size, name=args.name)
    if args.gradient_checkpointing:
        model.config.use_cache = False  # no cache while training (transformers warns otherwise)
        enable_checkpointing(model)
    opt = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total = total_steps(steps_per_epoch, args.epochs, args.max_steps)
    step = 0
    saved = None  # the step of the checkpoint on disk
    if state is not None:
        module.load_state_dict(state["prefix"])
        opt.load_state_dict(state["optimizer"])
        step = saved = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)

    def save_checkpoint():
        nonlocal saved
        try:
            atomic.save_torch({"step": step, "prefix": module.state_dict(), "optimizer": opt.state_dict(),
                               "torch_rng": torch.get_rng_state(),
                               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                               "args": plain_args(args), "settings": settings}, ckpt_path)
        except OSError as exc:  # a full disk, a file-size limit: the one on disk is whole
            raise TrainingFailed(f"step {step}: cannot write the checkpoint {ckpt_path}: "
                                 f"{exc.strerror or exc}; {kept()}") from None
        saved = step
        signals.note = resume_note(step, ckpt_path)

    def kept() -> str:
        return (f"the checkpoint of step {saved} in {ckpt_path} is kept" if saved is not None
                else "no checkpoint was saved")

    def not_finite(what: str, value: float) -> TrainingFailed:
        return TrainingFailed(f"step {step}: the {what} is {value} (not finite): training diverged; "
                              f"stopped without saving this step ({kept()}); try a lower --lr")

    def no_gradient() -> TrainingFailed:
        return TrainingFailed(
            f"step {step}: no gradient reached the prefix {args.name!r}: the base model's layers "
            "pass none back (bitsandbytes' 4-bit layers on the CPU, for one, pass none after "
            "an evaluation forward: train with --eval-every 0, or on a GPU); stopped without "
            f"saving this step ({kept()})")

    if step > total:
        warn("note", f"the checkpoint is at step {step}, past the {total} steps this run asks for "
                     f"(--max-steps / --epochs): nothing to run; the adapter is step {step}'s")
    model.train()
    bar = progress_bar(total, "prefix tuning", "step", enabled=not args.no_progress, initial=step)
    t0, tokens, first_step = time.perf_counter(), 0, step
    loss_value = float("nan")
    signals.raise_if_received()  # one whose Interrupted was lost while the run was set up
    signals.deferred = True  # a signal now stops after the current step, with a checkpoint of it
    try:
        while step < total:
            running = step + 1  # the step in progress, for an out-of-memory error
            epoch, index = divmod(step, steps_per_epoch)
            batch = [data[i] for i in batch_order(len(data), args.batch_size, args.seed, epoch)[index]]
            loss_value, n_tokens = train_step(model, opt, batch, pad_id, args.name, args.pack, device)
            step += 1
            if not math.isfinite(loss_value):
                raise not_finite("training loss", loss_value)
            if all(p.grad is None for p in module.parameters()):
                raise no_gradient()
            tokens += n_tokens
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            record = {"step": step, "loss": loss_value, "tokens_per_s": rate}
            if eval_data and _every(step, args.eval_every, total):
                record["eval_loss"] = evaluate(model, eval_data, args.batch_size, pad_id, args.name, device)
                if not math.isfinite(record["eval_loss"]):
                    raise not_finite("eval loss", record["eval_loss"])
                # on standard error with the bar: standard output is for the result line
                bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}", file=sys.stderr)
            append_log(args.output, record)
            if step == total or _every(step, args.save_every, total) or signals.received:
                save_checkpoint()
            if signals.received:
                raise Interrupted(signals.received, signals.note)
    except Exception as exc:
        reason = out_of_memory(exc)
        if reason is None:
            raise
        raise TrainingFailed(f"step {running}: out of memory ({reason}); stopped without saving this "
                             f"step ({kept()}); lower --batch-size or --max-length, or add "
                             "--gradient-checkpointing (or --dtype bfloat16)") from None
    finally:
        signals.deferred = False
        bar.close()
    adapter_dir = os.path.join(args.output, ADAPTER)
    write_adapter(model, args.name, adapter_dir, model_dir)
    print(f"{training_summary(step, step - first_step, loss_value)}; adapter (PEFT format): {adapter_dir}")
    return 0


def total_steps(steps_per_epoch: int, epochs: Optional[int], max_steps: Optional[int]) -> int:
    """The steps of the run: ``--max-steps`` when given (it overrides ``--epochs``: the data is
    cycled, each epoch in its own order), else ``--epochs`` (default 1) passes."""
    if max_steps is not None:
        return max_steps
    return steps_per_epoch * (1 if epochs is None else epochs)


def training_device(name: Optional[str]) -> torch.device:
    """The ``--device`` (default: the CPU, with a note when CUDA is there to use)."""
    if name is None:
        if torch.cuda.is_available():
            warn("note", "training on the CPU; a CUDA GPU is available: pass --device cuda to use it")
        return torch.device("cpu")
    device, problem = cli_args.device_problem(name)
    if problem is not None:
        raise TrainError(problem)
    return device


def training_summary(step: int, ran: int, loss: float) -> str:
    done = f"trained {step} step{'' if step == 1 else 's'}"
    if ran == 0:
        return done + " (no steps left to run)"
    return done + f", last loss {loss:.4f}"


def resume_note(step: int, ckpt_path: str) -> str:
    return (f"the checkpoint of step {step} is in {ckpt_path}; to continue, run the same command "
            f"again with --resume")


def _every(step: int, every: int, total: int) -> bool:
    """Due at ``step`` for an ``--eval-every``/``--save-every`` of ``every`` (0: never by count)."""
    return every > 0 and (step % every == 0 or step == total)


def write_adapter(model, name: str, adapter_dir: str, model_dir: Optional[str]) -> None:
    """The prefix ``name`` as a PEFT adapter, naming ``model_dir`` as its base model."""
    model.prefix_bank.save_peft(name, adapter_dir)
    if model_dir is not None:  # so that PEFT finds the base model
        cfg_path = os.path.join(adapter_dir, "adapter_config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = os.path.abspath(model_dir)
        atomic.write_text(cfg_path, json.dumps(cfg, indent=2))


def main(argv: Optional[List[str]] = None) -> int:
    """``prefix-attn train ...`` as a function: ``main(["data.jsonl", "-o", "out"])``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
