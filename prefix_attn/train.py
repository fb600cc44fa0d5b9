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
shows tokens/s and the loss (and, before, the tokenising of the data when that takes over a
second: a fast HF tokenizer gets the examples in chunks, encoded on every core); the held-out loss is computed every ``--eval-every`` steps and
logged to ``OUT/log.jsonl``, with each step's loss, tokens/s, ``lr`` and (with
``--max-grad-norm``) ``grad_norm``.

AdamW steps as HF Trainer's would: ``--lr-scheduler`` constant (the default: ``--lr``
throughout), linear or cosine (from ``--lr`` down to 0 where the run ends: the last step takes
``--lr / (steps - warm-up)`` with linear) after ``--warmup-steps`` N (default 0: the rate
rises linearly from 0, the first step's, to ``--lr`` at step N + 1; with linear or cosine N
must be less than the run's steps; with constant a warm-up longer than the run ends it still
warming up). ``--max-grad-norm`` X clips the prefix's gradient norm to X (default: no
clipping). ``--gradient-accumulation-steps`` K (default 1) makes a step of the examples
``--batch-size`` N*K would draw, run as K micro-batches of N with the loss weighted by tokens
over the whole step (its loss and gradient are the big batch's, in one micro-batch's memory). ``OUT/checkpoint.pt`` (prefix,
optimizer, step, RNG, settings) is written atomically every ``--save-every`` steps and at the
end, and ``--resume`` continues from it, giving the same result as an uninterrupted run: it
refuses settings that would change that result (data, model, batch size, seed, ...; with a
linear or cosine ``--lr-scheduler`` the total steps too: the rates depend on it), and cuts
the log back to the checkpoint's step. Ctrl-C (SIGINT) or SIGTERM stops after the current step
with a checkpoint of it (exit status 130 / 143); a second one stops at once. The result is
``OUT/adapter`` in PEFT's format (``peft.PeftModel.from_pretrained(base, OUT/adapter)`` loads it).

As HF Trainer's ``metric_for_best_model`` (eval_loss) and ``EarlyStoppingCallback``: with
``--save-best`` each evaluation whose loss is the lowest so far writes that step's prefix to
``OUT/best`` (``OUT/best/adapter``, or a multi-task run's ``OUT/best/adapters/NAME`` and
``OUT/best/bank``), its log line saying ``"best": true``, and the result line names the best
step and loss; ``OUT/adapter`` stays the last step's (HF without ``load_best_model_at_end``).
``--early-stopping-patience`` N stops the run after N evaluations in a row that did not lower
the best eval loss by more than ``--early-stopping-threshold`` (default 0): exit status 0, a
note naming the step, its checkpoint and results written as at the end. Both need an eval loss
(``--eval-every`` > 0 and an eval set not empty: refused otherwise). The checkpoint records the
best (step, loss), the count and the best prefix, and ``--resume`` goes on from them (a
checkpoint of an older version: no evaluation yet; one of a run without ``--save-best`` is
refused with it); a resume puts the checkpoint's best back in ``OUT/best``. A run ended by
``--max-steps`` off an ``--eval-every`` multiple evaluated its last step: resumed further, that
evaluation counts, where an uninterrupted run has none.

Multi-task: a JSON example (``--chat``'s too) may give ``"prefix": NAME`` (a string; null or missing: ``--name``'s
prefix). Data that names several prefixes trains one per name (all of ``--num-virtual-tokens``
and ``--projection-hidden-size``), in the same batches, each row under its own prefix (with
``--pack``, each packed sequence); a prefix's gradient comes from its rows only, and a step
whose rows do not use a prefix leaves it alone. The result is then ``OUT/adapters/NAME`` (a PEFT
adapter per prefix) and ``OUT/bank`` (all of them, ``PrefixBank.save``: ``prefix-attn generate
--model BASE --bank OUT/bank`` serves each by the request's ``"prefix"``), not ``OUT/adapter``;
``log.jsonl``'s evaluations give ``eval_loss_by_prefix`` too, and ``--max-grad-norm`` clips
the norm of all the prefixes' gradients together. A name must be a bank entry's, with no
``=``, ``/`` or ``\\``, not ``.`` or ``..``, and no two may differ in case only; an eval example
whose prefix has no training example (all of them held out, too) is refused, and so is a prefix
whose every example is dropped (no token to learn): it would stay untrained. ``--resume`` refuses another set of prefixes.

``--chat`` trains a prefix for ``prefix-attn generate --chat`` (an instruct model): each
example is rendered with the tokenizer's chat template, ``{"prompt", "completion"}`` as the
conversation [user, assistant], ``{"messages": [...]}`` as given (a request's messages, then
the assistant message learnt); the loss is on that last assistant turn only (its end-of-turn
tokens included), and the tokens before it must be those generate --chat feeds (checked; a
template or example where they are not is refused). ``{"text"}`` and plain text are refused.
``--chat-turns all`` learns every assistant turn of a conversation instead, in one pass over
it: each after exactly the tokens generate --chat feeds for the messages before it, its own
tokens where the whole rendering puts them (a template rewriting earlier turns, as Qwen3's
drops their think blocks, is refused naming the example and turn); a --max-length cut keeps
the turns before it whole. ``--chat-turns each`` learns every assistant turn too, each in a
row of its own: for assistant message J the conversation ``messages[:J + 1]``, rendered and
checked exactly as ``last`` renders an example ending with it (sound on every template, Qwen3's
included, the shared context computed again per turn); an example of 3 turns is 3 rows, and
the batches, ``--eval-fraction`` and the notes on cut or dropped rows count rows; errors name
the example's line and the turn. The checkpoint records ``--chat-turns`` (older ones count as
``last``).

Several GPUs: ``torchrun --nproc-per-node 4 -m prefix_attn.cli train data.jsonl -o OUT
--device cuda`` (found from torchrun's WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
each process on ``cuda:LOCAL_RANK``, the group on ``--dist-backend``: nccl on CUDA, gloo on the
CPU). ``--batch-size`` N is per process: a step of W processes learns from the examples one
process with ``--batch-size`` N*W would draw, each process running its N of every micro-batch,
and one all-reduce per step sums the token-weighted prefix gradients, losses and token counts
(the one-process result within float rounding); evaluation is split over the processes. Rank 0
alone writes OUT and shows the bars; an error in the data is said once, every process exiting
with its status; the checkpoint records the process count (``--resume`` refuses another); a
signal to any process stops all after the same step, with its checkpoint. Tested on CPU
processes (gloo) only: the nccl path has not run on GPUs.

Errors in the data or options are reported as ``prefix-attn train: error: ...`` (exit status
2) before anything is written. A loss (or eval loss) that is not finite stops the run with an
error naming the step (exit status 1), and so does a gradient norm that is not finite (with
``--max-grad-norm``): that step is neither logged nor saved, and the last
checkpoint stays. ``OUT/log.jsonl`` is strict JSON (never a bare NaN).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import atomic, cli_args, cli_parsers, tiny, train_best, train_chat, train_dist, train_prefixes
from .train_data import (batch_order, collate, collate_packed, eval_cost_note, prepare, read_examples_at,
                         split_eval)
from .backends import check_env_backend
from .chat import options_need_chat
from .train_best import BEST
from .train_prefixes import ADAPTERS, BANK, row_prefix
from .train_schedule import lr_factor, schedule_problem, set_lr
from .train_state import (BASE_MODEL, LOG, PROG, Interrupted, StopSignals, TrainError, TrainingFailed, append_log,
                          check_output_folder, check_same_settings, create_output_folder,
                          load_checkpoint, plain_args, run_settings, start_log, warn)

CHECKPOINT = "checkpoint.pt"
ADAPTER = "adapter"
DEFAULT_MAX_LENGTH = cli_parsers.DEFAULT_MAX_LENGTH
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype: the frozen base's


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
    """Mean token loss over ``data`` (no grad), in batches of rows of similar length, longest
    first (little padding; the sum does not depend on the order but for float rounding). A
    row's prefix is ``name``, or a multi-task run's row's own (its third item)."""
    return eval_losses(model, data, batch_size, pad_id, name, device)[0]


def eval_losses(model, data, batch_size: int, pad_id: int, name: str,
                device: Optional[torch.device] = None,
                by_prefix: bool = False, group: Optional["train_dist.Group"] = None,
                names: Sequence[str] = ()) -> Tuple[float, Dict[str, float]]:
    """(:func:`evaluate`'s mean token loss, {prefix: the mean token loss of its rows, sorted by
    name} with ``by_prefix``, else {}). With a torchrun ``group`` each rank runs every
    WORLD_SIZE-th batch and the sums are added up over the ranks (``names``: every prefix an
    eval row may use), every rank getting the result."""
    was = model.training
    model.eval()
    total, count, sums = 0.0, 0, {}
    order = sorted(data, key=lambda row: -len(row[0]))  # stable: equal lengths in data's order
    first, stride = (0, 1) if group is None else (group.rank, group.world)
    with torch.no_grad():
        for i in range(first * batch_size, len(order), stride * batch_size):
            rows = order[i:i + batch_size]
            prefixes = [row_prefix(row, name) for row in rows]
            ids, mask, labels = (t.to(device) for t in collate(rows, pad_id))
            logits = model(ids, attention_mask=mask, prefixes=prefixes).logits
            tgt = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tgt,
                                                    ignore_index=-100, reduction="none")  # 0 where ignored
            total += nll.sum().item()
            count += int((tgt != -100).sum())
            if by_prefix:  # the same token losses, summed by row
                for prefix, loss, n in zip(prefixes, nll.sum(1).tolist(), (tgt != -100).sum(1).tolist()):
                    acc = sums.setdefault(prefix, [0.0, 0])
                    acc[0] += loss
                    acc[1] += n
    model.train(was)
    if group is not None:
        total, count, sums = _summed_over(group, total, count, sums, names if by_prefix else ())
    return total / max(count, 1), {p: loss / max(n, 1) for p, (loss, n) in sorted(sums.items())}


def _summed_over(group, total: float, count: int, sums: dict, names: Sequence[str]):
    """:func:`eval_losses`' sums of this rank, added up over the ranks (one all-reduce): the
    prefixes among ``names`` that some rank's rows use."""
    values = group.sum([total, count] + [x for n in names for x in sums.get(n, (0.0, 0))])
    pairs = zip(values[2::2], values[3::2])
    return values[0], int(values[1]), {n: [loss, int(k)] for n, (loss, k) in zip(names, pairs) if k}


def train_step(model, opt, batch, pad_id: int, name: str, pack: bool,
               device: Optional[torch.device] = None, micro_batch_size: Optional[int] = None,
               max_grad_norm: Optional[float] = None, group: Optional["train_dist.Group"] = None,
               received: Optional[int] = None) -> Tuple[float, int, Optional[float]]:
    """One optimizer step on ``batch``, run as micro-batches of ``micro_batch_size`` examples
    (default: all in one) whose gradients add up: (loss, tokens in the batch, the prefixes'
    gradient norm before clipping to ``max_grad_norm``, None without it). Each micro-batch's
    mean loss is weighted by its share of the step's learnt tokens, so loss and gradient are
    those of ``batch`` in one forward. Each row runs under prefix ``name``, or a multi-task
    run's row under its own (its third item): a prefix's gradient is then the sum of its rows'
    token losses over all the step's learnt tokens, None when no row of the step uses it.
    No optimizer step when the norm is not finite. With a torchrun ``group`` this rank runs its
    share of ``batch`` (:meth:`train_dist.Group.share`, micro-batches of ``micro_batch_size``),
    and the gradients, loss and tokens are summed over the ranks before the step (the signal
    this rank ``received``, if any, goes with them: ``group.stop``)."""
    size = micro_batch_size or len(batch)
    if group is not None:
        batch = group.share(batch, size)
    parts = [batch[i:i + size] for i in range(0, len(batch), size)]
    micro = [_collated(rows, pad_id, pack) for rows in parts]
    counts = [int((labels[:, 1:] != -100).sum()) for _, _, labels in micro]
    learnt = sum(counts)
    opt.zero_grad(set_to_none=True)
    losses, n_tokens, stepped = [], 0, False  # one host sync for the step's loss, at the end
    for rows, tensors, count in zip(parts, micro, counts):
        loss, tokens = _forward(model, tensors, [row_prefix(row, name) for row in rows], pack, device)
        weight = count / learnt if learnt else 1.0  # 1.0 with one micro-batch: the loss as it is
        if group is not None:  # the token losses' sum: divided by the step's tokens, all ranks'
            weight = count
        n_tokens += tokens
        if not weight:  # nothing learnt in this micro-batch: its mean loss is 0 / 0
            continue
        losses.append(loss.detach().float() * weight)
        if loss.requires_grad and count:  # else nothing reached the prefix: the caller's check says so
            (loss * weight).backward()
            stepped = True
    params = [p for g in opt.param_groups for p in g["params"]]
    if group is not None:
        loss_value, n_tokens, stepped = group.reduce_step(params, torch.stack(losses).sum() if losses else None,
                                                          learnt, n_tokens, stepped, received)
    else:
        loss_value = float(torch.stack(losses).sum()) if losses else 0.0
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm)) \
        if stepped and max_grad_norm is not None else None
    if stepped and (norm is None or math.isfinite(norm)):
        opt.step()
    return loss_value, n_tokens, norm


def _collated(batch, pad_id: int, pack: bool):
    """(ids, attention mask or position ids, labels) of ``batch``: padded rows, or one packed row."""
    return collate_packed(batch) if pack else collate(batch, pad_id)


def _forward(model, tensors, prefixes: List[str], pack: bool, device: Optional[torch.device]):
    """(mean loss over the learnt tokens, tokens run) of one collated micro-batch, its
    examples under ``prefixes`` (one each). The tokens are counted on the host tensors (no
    device sync)."""
    tokens = tensors[0].numel() if pack else int(tensors[1].sum())
    ids, second, labels = (t.to(device) for t in tensors)
    if pack:  # the packed row under its one prefix, or each packed sequence under its own
        per = prefixes[:1] if len(set(prefixes)) == 1 else prefixes
        return model(ids, position_ids=second, labels=labels, prefixes=per, use_cache=False).loss, tokens
    return model(ids, attention_mask=second, labels=labels, prefixes=prefixes).loss, tokens


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return cli_parsers.train_arguments(p)




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
    group = None  # a torchrun run's process group
    done = False  # every rank ends together: the group ends after a barrier
    try:
        with cli_args.transformers_progress(enabled=not args.no_progress and train_dist.env_rank() == 0), signals:
            group = train_dist.start(args.device, args.dist_backend)
            code = _train(args, signals, group)
            done = True
            return code
    except train_dist.Agreed as exc:  # another rank failed and said so
        done = True
        return exc.code
    except TrainError as exc:
        return _report(group, "error", str(exc), 2, exc)
    except TrainingFailed as exc:
        return _report(group, "error", str(exc), 1, exc)
    except Interrupted as stop:
        return _report(group, "stopped", f"{signal.Signals(stop.signum).name}: {stop.note}",
                       128 + stop.signum, stop)
    except Exception as exc:  # out of memory while the run was set up (the steps say theirs)
        reason = out_of_memory(exc)
        if reason is None:
            raise
        return _report(group, "error", f"out of memory while setting up the run ({reason}); {signals.note}; "
                                       "lower --projection-hidden-size or --num-virtual-tokens, or use "
                                       "--dtype bfloat16", 1, exc)
    finally:
        if group is not None:
            group.close(wait=done or group.together)


def _report(group, kind: str, message: str, code: int, exc: BaseException) -> int:
    """Say how the run ended and return its exit status; a torchrun run's ranks agree on it
    (:meth:`train_dist.Group.report`): an error that every rank reached (``exc.everywhere``)
    is said once, by rank 0."""
    if group is None:  # one process, or a torchrun rank before its group started
        if not (getattr(exc, "everywhere", False) and train_dist.env_rank() != 0):
            warn(kind, message)
        return code
    return group.report(kind, message, code, getattr(exc, "everywhere", False))


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


def _train(args: argparse.Namespace, signals: StopSignals, group: Optional["train_dist.Group"] = None) -> int:
    from prefix_attn.tuning import enable_checkpointing, prefix_tuning

    from .progress import progress_bar

    # everything is checked before the output folder is written
    for option, path in (("data", args.data), ("--eval-data", args.eval_data)):
        if path == "-":  # the checkpoint records the file's content, which --resume checks
            raise TrainError(f"{option}: train reads a file, not standard input (-): save it to a "
                             "file first")
    problem = train_best.option_problem(args)
    if problem is not None:
        raise TrainError(problem)
    check_output_folder(args.output, files=(CHECKPOINT, LOG), folders=(ADAPTER, BASE_MODEL)
                        + ((BEST,) if args.save_best else ()))
    device = training_device(args.device) if group is None else group.device
    world = 1 if group is None else group.world
    dtype = DTYPES[args.dtype]
    try:
        check_env_backend(device.type, "training")
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    problem = options_need_chat(args.chat_option, args.chat)
    if problem is None and args.chat_turns != "last" and not args.chat:
        problem = (f"--chat-turns {args.chat_turns}: chooses the assistant turns learnt under --chat "
                   "(without it an example has no turns)")
    if problem is not None:
        raise TrainError(problem)
    read = train_chat.read_examples_at if args.chat else read_examples_at
    examples = read(args.data)
    eval_examples = read(args.eval_data, what="--eval-data file") if args.eval_data else None
    named = train_prefixes.read_prefixes(args.data, args.name)
    eval_named = (train_prefixes.read_prefixes(args.eval_data, args.name, "--eval-data file")
                  if args.eval_data else None)
    names = train_prefixes.names_of(named, args.name)
    multi = len(names) > 1  # a multi-task run: each row under its own prefix
    if multi:
        train_prefixes.check_run_names(names, args.name)
        check_output_folder(args.output, folders=(ADAPTERS, BANK))
        check_output_folder(os.path.join(args.output, ADAPTERS), folders=names)
    if args.save_best:  # OUT/best: the layout of the end result
        best_dir = os.path.join(args.output, BEST)
        check_output_folder(best_dir, folders=(ADAPTERS, BANK) if multi else (ADAPTER,))
        if multi:
            check_output_folder(os.path.join(best_dir, ADAPTERS), folders=names)
    name = names[0]  # a single-prefix run's: --name, or the one prefix the data names
    chat = (train_chat.ChatExamples.of_model(args.model, dict(args.chat_option), args.chat_turns)  # before the model loads
            if args.chat else None)
    ckpt_path = os.path.join(args.output, CHECKPOINT)
    best = train_best.BestSoFar.of_args(args)
    if args.resume:
        state = load_checkpoint(ckpt_path)
        signals.note = resume_note(state["step"], ckpt_path)
        problem = best.restore(state)
        if problem is not None:
            raise TrainError(problem)
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
    progress = not args.no_progress and (group is None or group.main)
    data = prepare(tokenizer, examples, max_length, vocab_size, args.data, chat=chat, progress=progress,
                   prefix_of=train_prefixes.prefix_of(named, args.name) if multi else None)
    if eval_examples is not None:
        eval_data = prepare(tokenizer, eval_examples, max_length, vocab_size, args.eval_data,
                            what="--eval-data file", chat=chat, progress=progress,
                            prefix_of=train_prefixes.prefix_of(eval_named, args.name) if multi else None)
    elif args.eval_every == 0:  # no eval: nothing is held out, every example trains
        eval_data = []
    else:
        data, eval_data = split_eval(data, args.eval_fraction, args.seed)
    if not data:
        raise TrainError("no training examples left (all held out: pass a smaller --eval-fraction)")
    if not eval_data and train_best.no_eval_problem(args):
        raise TrainError(train_best.no_eval_problem(args))
    unit = "row" if chat is not None and chat.turns == "each" else "example"  # what data's items are
    # a plain-text --eval-data file's examples are --name's in a multi-task run (a single-prefix
    # run evaluates them under its one prefix)
    train_prefixes.check_eval_names({row_prefix(row, name) for row in data}, eval_data,
                                    args.name if multi else name, eval_named, args.eval_data, unit)
    if multi:
        train_prefixes.check_all_trained(names, {row_prefix(row, name) for row in data}, args.data)
    note = eval_cost_note(len(eval_data), args.eval_every, args.batch_size * args.gradient_accumulation_steps,
                          unit)
    if note is not None:
        warn("note", note)
    settings = run_settings(args, max_length, world)
    if state is not None:
        check_same_settings(state, settings, ckpt_path)
        train_prefixes.check_checkpoint_names(state, names if multi else None, ckpt_path)
    step_size = args.batch_size * world * args.gradient_accumulation_steps  # examples a step, all ranks'
    steps_per_epoch = math.ceil(len(data) / step_size)
    total = total_steps(steps_per_epoch, args.epochs, args.max_steps)
    problem = schedule_problem(args.lr_scheduler, args.warmup_steps, total,
                               state.get("total_steps") if state is not None else None)
    if problem is not None:
        raise TrainError(problem)

    if multi:
        unseen = train_prefixes.unseen_names(names, data, name, steps_per_epoch, total, step_size, args.seed)
        if unseen:
            warn("note", f"{len(unseen)} prefix{'es' if len(unseen) > 1 else ''} ({', '.join(map(repr, unseen))}) "
                         f"{'have' if len(unseen) > 1 else 'has'} no row in the {total} step"
                         f"{'' if total == 1 else 's'} of this run (--max-steps): written as initialised, untrained")

    main = group is None or group.main  # the process that writes the output folder
    if group is not None:
        group.ready()  # every rank's checks passed (else every rank exits, one saying why)
    _on_main(group, lambda: _start_output(args.output, model, tokenizer, model_dir if base_to_save else None,
                                          state["step"] if state is not None else None))
    if base_to_save:
        # loaded back in dtype as a resumed run (and generate --model OUT/base_model) loads
        # it: from_pretrained keeps what transformers keeps in float32 (RoPE's inv_freq), which
        # model.to(dtype) would round
        model = load_model(model_dir, args.output, args.seed, dtype=dtype)[0]
    model.to(device)  # before the prefix: it is made on the model's device

    modules = {n: prefix_tuning(model, num_virtual_tokens=args.num_virtual_tokens,
                                projection_hidden_size=args.projection_hidden_size, name=n)
               for n in names}  # in the order of their names
    if args.gradient_checkpointing:
        model.config.use_cache = False  # no cache while training (transformers warns otherwise)
        enable_checkpointing(model)
    params = [p for module in modules.values() for p in module.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    step = 0
    saved = None  # the step of the checkpoint on disk
    if state is not None:
        for n, module in modules.items():
            module.load_state_dict(state["prefix"][n] if multi else state["prefix"])
        opt.load_state_dict(state["optimizer"])
        step = saved = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
    if group is not None:
        group.broadcast(params)

    def write_best(prefix):
        """OUT/best from ``prefix`` (:func:`train_best.snapshot`'s), on rank 0 (all ranks call it)."""
        _on_main(group, lambda: train_best.write_with(
            modules, prefix, multi,
            lambda: _save(model, name, names if multi else None, args, model_dir, os.path.join(args.output, BEST))))

    if best.prefix is not None:  # a resumed run's: OUT/best may hold a step after the checkpoint's
        write_best(best.prefix)

    def save_checkpoint():
        nonlocal saved
        _on_main(group, write_checkpoint)
        saved = step
        signals.note = resume_note(step, ckpt_path)

    def write_checkpoint():
        try:
            prefix = ({n: module.state_dict() for n, module in modules.items()} if multi
                      else modules[name].state_dict())
            atomic.save_torch({"step": step, "prefix": prefix, **({"prefixes": names} if multi else {}),
                               "optimizer": opt.state_dict(),
                               "torch_rng": torch.get_rng_state(),
                               "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                               "args": plain_args(args), "settings": settings,
                               "total_steps": total, **best.checkpoint()}, ckpt_path)
        except OSError as exc:  # a full disk, a file-size limit: the one on disk is whole
            raise TrainingFailed(f"step {step}: cannot write the checkpoint {ckpt_path}: "
                                 f"{exc.strerror or exc}; {kept()}") from None

    def kept() -> str:
        return (f"the checkpoint of step {saved} in {ckpt_path} is kept" if saved is not None
                else "no checkpoint was saved")

    def not_finite(what: str, value: float) -> TrainingFailed:
        return _everywhere(TrainingFailed(f"step {step}: the {what} is {value} (not finite): training diverged; "
                              f"stopped without saving this step ({kept()}); try a lower --lr"))

    def no_gradient() -> TrainingFailed:
        return _everywhere(TrainingFailed(
            f"step {step}: no gradient reached the prefix{'es' if multi else ''} "
            f"{', '.join(map(repr, names))}: the base model's layers "
            "pass none back (bitsandbytes' 4-bit layers on the CPU, for one, pass none after "
            "an evaluation forward: train with --eval-every 0, or on a GPU); stopped without "
            f"saving this step ({kept()})"))

    if step > total:
        warn("note", f"the checkpoint is at step {step}, past the {total} steps this run asks for "
                     f"(--max-steps / --epochs): nothing to run; the adapter is step {step}'s")
    if best.stopping and step < total:
        warn("note", f"the checkpoint's run {best.stop_note(step)}: nothing to run (a larger "
                     "--early-stopping-patience goes on)")
    model.train()
    bar = progress_bar(total, "prefix tuning", "step", enabled=progress, initial=step)
    t0, tokens, first_step = time.perf_counter(), 0, step
    loss_value = float("nan")
    signals.raise_if_received()  # one whose Interrupted was lost while the run was set up
    signals.deferred = True  # a signal now stops after the current step, with a checkpoint of it
    try:
        while step < total and not best.stopping:
            running = step + 1  # the step in progress, for an out-of-memory error
            epoch, index = divmod(step, steps_per_epoch)
            batch = [data[i] for i in batch_order(len(data), step_size, args.seed, epoch)[index]]
            lr = args.lr * lr_factor(step, total, args.warmup_steps, args.lr_scheduler)
            set_lr(opt, lr)
            loss_value, n_tokens, grad_norm = train_step(model, opt, batch, pad_id, name, args.pack, device,
                                                         args.batch_size, args.max_grad_norm, group,
                                                         signals.received)
            step += 1
            if not math.isfinite(loss_value):
                raise not_finite("training loss", loss_value)
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise not_finite("gradient norm", grad_norm)
            if all(p.grad is None for p in params):
                raise no_gradient()
            tokens += n_tokens
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            record = {"step": step, "loss": loss_value, "tokens_per_s": rate, "lr": lr}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if eval_data and _every(step, args.eval_every, total):
                record["eval_loss"], by_prefix = eval_losses(model, eval_data, args.batch_size, pad_id, name,
                                                             device, by_prefix=multi, group=group, names=names)
                if not math.isfinite(record["eval_loss"]):
                    raise not_finite("eval loss", record["eval_loss"])
                each = ""
                if multi:
                    record["eval_loss_by_prefix"] = by_prefix
                    each = " (" + ", ".join(f"{p} {loss:.4f}" for p, loss in by_prefix.items()) + ")"
                # on standard error with the bar: standard output is for the result line
                if main:
                    bar.write(f"step {step}: eval loss {record['eval_loss']:.4f}{each}", file=sys.stderr)
                # every rank gets the same eval loss (summed over the ranks): they decide alike
                if best.update(record["eval_loss"], step, lambda: train_best.snapshot(modules, multi)) \
                        and args.save_best:
                    write_best(best.prefix)
                    record["best"] = True
            if main:
                append_log(args.output, record)
            # a torchrun run stops on the signal some rank received before the step's all-reduce
            stop = signals.received if group is None else group.stop
            if step == total or _every(step, args.save_every, total) or stop or best.stopping:
                save_checkpoint()
            if stop:
                raise _everywhere(Interrupted(stop, signals.note))
            if best.stopping:
                warn("note", best.stop_note(step))
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
    summary = training_summary(step, step - first_step, loss_value, best.stopping)
    summary += best.summary(os.path.join(args.output, BEST))
    _on_main(group, lambda: print(f"{summary}; "
                                  f"{_save(model, name, names if multi else None, args, model_dir, args.output)}"))
    return 0


def _save(model, name: str, names: Optional[List[str]], args, model_dir: str, folder: str) -> str:
    """The trained prefix as ``folder/adapter``, or a multi-task run's ``names`` as adapters and
    a bank in ``folder`` (``OUT``: the result; ``OUT/best``: ``--save-best``'s); the result
    line's words on them."""
    if names is not None:
        return write_prefixes(model, names, folder, model_dir, chat_flags(args))
    adapter_dir = os.path.join(folder, ADAPTER)
    write_adapter(model, name, adapter_dir, model_dir)
    return f"adapter (PEFT format): {adapter_dir}"


def _start_output(out_dir: str, model, tokenizer, base_dir: Optional[str], resume_step: Optional[int]) -> None:
    """The output folder made, the drawn base model saved to ``base_dir`` (None: none drawn),
    the log started (a resumed run's cut back to its checkpoint's step)."""
    create_output_folder(out_dir)
    if base_dir is not None:
        save_base_model(model, tokenizer, base_dir)  # float32, as drawn
    start_log(out_dir, resume_step)


def _on_main(group, write) -> None:
    """``write()`` here, or in a torchrun run on rank 0, the others waiting for its outcome."""
    if group is None:
        write()
    else:
        group.on_main(write)


def _everywhere(exc: BaseException) -> BaseException:
    """``exc``, marked as raised on every rank of a torchrun run alike (said once, by rank 0)."""
    exc.everywhere = True
    return exc


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


def training_summary(step: int, ran: int, loss: float, early: bool = False) -> str:
    done = f"trained {step} step{'' if step == 1 else 's'}" + (" (stopped early)" if early else "")
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


def chat_flags(args: argparse.Namespace) -> str:
    """The options generate needs to serve a prefix trained under ``--chat``: ``--chat`` and
    each ``--chat-option`` (a prefix learnt after the template's tokens is served after them);
    "" without --chat."""
    if not args.chat:
        return ""
    flags = " --chat"
    for key, value in args.chat_option:
        if not isinstance(value, str):
            text = json.dumps(value)
        else:  # text that would read as JSON (e.g. "false") is given as a JSON string
            try:
                json.loads(value)
                text = json.dumps(value)
            except ValueError:
                text = value
        flags += f" --chat-option {shlex.quote(f'{key}={text}')}"
    return flags


def write_prefixes(model, names: List[str], out_dir: str, model_dir: str, flags: str = "") -> str:
    """A multi-task run's prefixes as PEFT adapters ``out_dir/adapters/NAME`` and as one bank
    ``out_dir/bank`` (``PrefixBank.save``); returns the summary's words on them, the generate
    command serving them given ``flags`` (:func:`chat_flags`)."""
    adapters = os.path.join(out_dir, ADAPTERS)
    for n in names:
        write_adapter(model, n, os.path.join(adapters, n), model_dir)
    bank_dir = os.path.join(out_dir, BANK)
    model.prefix_bank.save(bank_dir)
    return (f"{len(names)} prefixes ({', '.join(names)}): adapters (PEFT format) {adapters}{os.sep}NAME; "
            f"all in one bank {bank_dir}: serve with prefix-attn generate --model {model_dir} --bank "
            f"{bank_dir}{flags} (a request's \"prefix\" names one)")


def main(argv: Optional[List[str]] = None) -> int:
    """``prefix-attn train ...`` as a function: ``main(["data.jsonl", "-o", "out"])``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
