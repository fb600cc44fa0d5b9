"""The state of a ``prefix-attn train`` run in its output folder, and what stops it: user
errors (:class:`TrainError`), the log, the checkpoint and the settings a resumed run must
share with it, and SIGINT / SIGTERM (:class:`StopSignals`)."""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import threading
from typing import Dict, Optional

import torch

from . import atomic

LOG = "log.jsonl"
BASE_MODEL = "base_model"  # the built-in base model a run draws, saved in its output folder
PROG = "prefix-attn train"


class TrainError(ValueError):
    """A user error (data, options, output folder, checkpoint): reported as
    ``prefix-attn train: error: ...`` with exit status 2, no traceback."""


class TrainingFailed(Exception):
    """The run cannot go on (the loss is no longer finite): reported as ``prefix-attn train:
    error: ...`` with exit status 1; the step is not saved (the last checkpoint stays)."""


class Interrupted(BaseException):
    """SIGINT / SIGTERM stopped the run; ``note`` says what was saved."""

    def __init__(self, signum: int, note: str):
        super().__init__(signum, note)
        self.signum, self.note = signum, note


_SPEAKER = [PROG]  # the command whose notes warn prints (train's, unless speaking_as says otherwise)
_quiet = False  # a torchrun run's ranks other than 0: rank 0 says what all of them would


def set_quiet(quiet: bool) -> None:
    """Silence :func:`warn` (the other ranks of a torchrun run) or not."""
    global _quiet
    _quiet = quiet


def warn(kind: str, message: str) -> None:
    if not _quiet:
        print(f"{_SPEAKER[-1]}: {kind}: {message}", file=sys.stderr)


@contextlib.contextmanager
def speaking_as(prog: str):
    """:func:`warn` speaks as ``prog`` inside (``prefix-attn eval`` reads data as train does)."""
    _SPEAKER.append(prog)
    try:
        yield
    finally:
        _SPEAKER.pop()


# --------------------------------------------------------------------------------------
# output folder: log, checkpoint, settings
# --------------------------------------------------------------------------------------
def append_log(out_dir: str, record: dict) -> None:
    """One JSON line; a number that is not finite is written as null (JSON has no NaN; the
    trainer stops before logging one, this keeps the log valid JSON whatever it is given)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(os.path.join(out_dir, LOG), "a", encoding="utf-8") as f:
        f.write(json.dumps(clean, allow_nan=False) + "\n")


def start_log(out_dir: str, resume_step: Optional[int]) -> None:
    """A fresh run starts an empty log; a resumed one keeps the records up to its checkpoint's
    step (a run stopped after its last checkpoint logged steps that now run again). Atomic."""
    path = os.path.join(out_dir, LOG)
    kept = []
    if resume_step is not None and os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    keep = json.loads(line)["step"] <= resume_step
                except (ValueError, TypeError, KeyError):
                    keep = False  # a line cut short by a kill
                if keep:
                    kept.append(line.rstrip("\n") + "\n")
    atomic.write_text(path, "".join(kept))


def check_output_folder(out_dir: str, files=(), folders=()) -> None:
    """Before any work: ``out_dir`` is a folder this process can write (or can be made in one),
    and the ``files`` / ``folders`` a run writes in it are not of the other kind."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise TrainError(f"--output {out_dir} is a file, not a folder")
    existing = out_dir
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing.rstrip(os.sep)) if existing != os.sep else ""
    existing = existing or "."
    if not os.path.isdir(existing):
        raise TrainError(f"--output {out_dir}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "the output folder" if existing == out_dir else f"the output folder's parent {existing}"
        raise TrainError(f"--output {out_dir}: {what} is not writable")
    for name in files:
        if os.path.isdir(os.path.join(out_dir, name)):
            raise TrainError(f"--output {out_dir}: {name} there is a folder; the run writes a file "
                             "of that name (move it away, or choose another --output)")
    for name in folders:
        path = os.path.join(out_dir, name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise TrainError(f"--output {out_dir}: {name} there is a file; the run writes a folder "
                             "of that name (move it away, or choose another --output)")


def create_output_folder(out_dir: str) -> None:
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise TrainError(f"cannot create the output folder {out_dir}: {exc.strerror}") from None


def plain_args(args) -> dict:
    """The command's arguments as saved in a checkpoint: plain values only (the ``prefix-attn``
    parser also holds the subcommand's function, which a weights-only load refuses)."""
    plain = (str, int, float, bool, type(None))
    return {k: v for k, v in vars(args).items()
            if isinstance(v, plain) or (isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v))}


def load_checkpoint(path: str) -> dict:
    """The checkpoint at ``path``; a :class:`TrainError` when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise TrainError(f"--resume: no checkpoint at {path}")
    try:
        # tensors, numbers, strings and containers only: a checkpoint runs no code when loaded
        # checkpoints written through the `prefix-attn` command before plain_args also hold
        # the subcommand's function: allowed by name (a reference, no code runs)
        from prefix_attn.train import run

        allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with allow([run]) if allow is not None else contextlib.nullcontext():
            state = torch.load(path, weights_only=True, map_location="cpu")  # any device resumes it
    except Exception as exc:  # truncated zip, pickle garbage, ...: torch raises many kinds
        if "Weights only load failed" in str(exc):
            raise TrainError(f"{path} holds objects other than tensors, numbers, strings and "
                             "containers of them (not a checkpoint of prefix-attn train, or altered): "
                             "not loaded, since unpickling them could run code; delete it to start "
                             "over (without --resume), or restore it") from None
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TrainError(f"{path} is unreadable ({reason}); delete it to start over "
                         f"(without --resume), or restore it") from None
    if not isinstance(state, dict) or not {"step", "prefix", "optimizer", "torch_rng"} <= set(state):
        raise TrainError(f"{path} is unreadable (not a checkpoint of prefix-attn train); delete it "
                         f"to start over (without --resume), or restore it")
    return state


def file_fingerprint(path: Optional[str]) -> Optional[dict]:
    """{path, size, sha256} of a data file (None for None): the content identifies it."""
    if path is None:
        return None
    with open(path, "rb") as f:
        digest = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256": digest.hexdigest()}


WORLD = "WORLD_SIZE (torchrun's processes)"  # the setting of a run's process count


def run_settings(args: argparse.Namespace, max_length: int, world: int = 1) -> Dict[str, object]:
    """What fixes the result up to any step, keyed by option: a resumed run must match them.
    (--epochs, --max-steps, --save-every, --eval-every, --name, --gradient-checkpointing,
    --device and --no-progress may change, the total steps not under a decaying --lr-scheduler:
    :func:`prefix_attn.train_schedule.schedule_problem` checks that; another device gives the result within float
    rounding; --eval-every to or from 0 changes the data held out for eval, a change of
    --eval-fraction.) ``--model OUTPUT/base_model`` is the run's own saved base model,
    the same as no ``--model`` (a resumed run without it loads that folder). ``world``: the
    processes of a torchrun run (``WORLD_SIZE``; its steps are ``--batch-size`` x ``world``
    examples, summed in another order on another number)."""
    model = os.path.abspath(args.model) if args.model else None
    if model is not None and os.path.realpath(model) == os.path.realpath(os.path.join(args.output, BASE_MODEL)):
        model = None
    return {"data": file_fingerprint(args.data), "--eval-data": file_fingerprint(args.eval_data),
            "--model": model,
            "--batch-size": args.batch_size, "--seed": args.seed, "--max-length": max_length,
            "--num-virtual-tokens": args.num_virtual_tokens,
            "--projection-hidden-size": args.projection_hidden_size, "--pack": args.pack,
            # unused with --eval-data: not a setting then (None matches any older value); with
            # --eval-every 0 nothing is held out, whatever the fraction
            "--eval-fraction": _eval_fraction(args), "--lr": args.lr, "--weight-decay": args.weight_decay,
            "--dtype": getattr(args, "dtype", "float32"), "--chat": bool(getattr(args, "chat", False)),
            "--chat-turns": getattr(args, "chat_turns", "last"),
            # JSON text: a dict here is a file's fingerprint
            "--chat-option": json.dumps(dict(sorted(getattr(args, "chat_option", None) or []))),
            "--gradient-accumulation-steps": getattr(args, "gradient_accumulation_steps", 1),
            "--lr-scheduler": getattr(args, "lr_scheduler", "constant"),
            "--warmup-steps": getattr(args, "warmup_steps", 0),
            "--max-grad-norm": getattr(args, "max_grad_norm", None), WORLD: world}


# settings added after checkpoints recorded settings, with the value every older run had: a
# checkpoint without one is compared as having it
LATER_SETTINGS = {"--dtype": "float32", "--chat": False, "--chat-option": "{}", "--chat-turns": "last",
                  "--gradient-accumulation-steps": 1, "--lr-scheduler": "constant", "--warmup-steps": 0,
                  "--max-grad-norm": None, WORLD: 1}


NOTHING_HELD_OUT = "0 (--eval-every 0: nothing held out)"


def _eval_fraction(args: argparse.Namespace):
    """The share of the data held out (a setting: it changes the data trained on)."""
    if args.eval_data is not None:
        return None
    return args.eval_fraction if args.eval_every > 0 else NOTHING_HELD_OUT


def _same_setting(old, new) -> bool:
    if isinstance(old, dict) and isinstance(new, dict):  # a file: same content, wherever it is
        return (old["size"], old["sha256"]) == (new["size"], new["sha256"])
    return old == new


def _show_setting(value) -> str:
    if isinstance(value, dict):
        return f"{value['path']} ({value['size']} bytes, sha256 {value['sha256'][:12]})"
    return "none" if value is None else str(value)


def _hint(key: str, was, now) -> str:
    """How to give a setting the checkpoint's value where its flag alone does not say it."""
    if key == "--eval-fraction" and now == NOTHING_HELD_OUT and isinstance(was, (int, float)):
        # a run of an older version held out --eval-fraction with --eval-every 0 too
        return (f" (this checkpoint held out {was} of the data: resume with --eval-every N > 0 "
                f"to hold out the same examples)")
    return ""


def check_same_settings(state: dict, settings: Dict[str, object], ckpt_path: str) -> None:
    """Refuse to resume a checkpoint made with other settings, listing each (old -> new)."""
    old = state.get("settings")
    if old is None:
        warn("warning", f"{ckpt_path} predates stored settings: not checked against this run's")
        return
    old = {**{k: v for k, v in LATER_SETTINGS.items() if k in settings}, **old}
    unused = {"--eval-fraction"} if settings.get("--eval-fraction") is None else set()
    changed = [f"{key}: {_show_setting(was)} -> {_show_setting(settings.get(key))}{_hint(key, was, settings.get(key))}"
               for key, was in old.items()
               if key not in unused and not _same_setting(was, settings.get(key))]
    if changed:
        raise TrainError("--resume with other settings than the checkpoint's (the result would not be "
                         "the uninterrupted run's):\n  " + "\n  ".join(changed)
                         + "\nrun with the checkpoint's settings, or use another --output")


# --------------------------------------------------------------------------------------
# signals, transformers' progress bars
# --------------------------------------------------------------------------------------
class StopSignals:
    """SIGINT / SIGTERM while installed (main thread only). While ``deferred`` (a training
    step runs) the first signal is recorded in ``received`` and the step finishes; otherwise,
    and for a second signal, :class:`_Interrupted` is raised at once with ``note`` (what is
    saved so far)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: Optional[int] = None
        self.deferred = False
        self.note = "nothing was saved"
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame) -> None:
        first = self.received is None
        if first:  # recorded even when raised: see raise_if_received
            self.received = signum
        if self.deferred and first:
            warn("note", f"{signal.Signals(signum).name}: stopping after this step "
                          f"(once more to stop at once, without saving it)")
            return
        raise Interrupted(signum, self.note)

    def raise_if_received(self) -> None:
        """:class:`Interrupted` for a signal already received. The handler's own raise can be
        lost: a signal handled while a ``__del__`` or a weakref callback runs (a garbage
        collection inside any library) raises there, and Python only prints it and goes on."""
        if self.received is not None:
            raise Interrupted(self.received, self.note)
