"""The learning rate of ``prefix-attn train`` at each step: ``--lr-scheduler`` and
``--warmup-steps``, as HF Trainer's ``get_{constant,linear,cosine}_schedule_with_warmup``.

The rate is a pure function of (step, total steps, warm-up), set before each optimizer step:
a checkpoint holds no scheduler state, and a resumed run takes the very rates of an
uninterrupted one. Torch-free (the option checks run before torch loads)."""
from __future__ import annotations

import math
from typing import Optional

SCHEDULERS = ("constant", "linear", "cosine")
DECAYING = ("linear", "cosine")  # their rates depend on the run's total steps


def lr_factor(done: int, total: int, warmup: int, scheduler: str) -> float:
    """The share of ``--lr`` for the step after ``done`` steps (HF's ``current_step``, from 0):
    ``done / warmup`` while warming up (the first step at 0), then 1 (constant), or from 1 down
    to 0 at ``total`` linearly or along half a cosine (linear: the last step takes
    ``1 / (total - warmup)``)."""
    if done < warmup:
        return done / warmup
    if scheduler == "constant":
        return 1.0
    progress = (done - warmup) / max(1, total - warmup)
    if scheduler == "linear":
        return max(0.0, 1.0 - progress)
    if scheduler == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown --lr-scheduler {scheduler!r}")


def set_lr(opt, lr: float) -> None:
    """Give every parameter group of ``opt`` the rate ``lr``."""
    for group in opt.param_groups:
        group["lr"] = lr


def schedule_problem(scheduler: str, warmup: int, total: int, saved_total: Optional[int] = None) -> Optional[str]:
    """Why the schedule cannot run ``total`` steps (None when it can): a decaying one whose
    warm-up takes the whole run, or, resuming a checkpoint made for ``saved_total`` steps,
    another total (the rates of the steps already taken would change). A constant rate,
    warm-up or not, does not depend on the total: it may grow, and a warm-up longer than the
    run ends it still warming up."""
    if scheduler not in DECAYING:
        return None
    if saved_total is not None and saved_total != total:
        return (f"--resume: --lr-scheduler {scheduler} decays over the checkpoint's {saved_total} steps, "
                f"not {total}: another total changes the rate of the steps already taken; resume with "
                f"--max-steps {saved_total} (or start a new --output)")
    if warmup >= total:
        return (f"--warmup-steps {warmup} is not less than the run's {total} steps: --lr-scheduler "
                f"{scheduler} would never decay; use fewer --warmup-steps, or --lr-scheduler constant")
    return None
