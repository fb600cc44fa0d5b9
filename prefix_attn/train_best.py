"""``prefix-attn train``'s best evaluation so far: ``--save-best`` (the prefixes of the step of
the lowest eval loss, in ``OUT/best``) and ``--early-stopping-patience`` (stop after N
evaluations in a row that do not improve on it), as HF Trainer's ``metric_for_best_model``
(eval_loss, lower is better) and ``EarlyStoppingCallback``.

An evaluation is the best so far when its loss is lower than every earlier one (the first
always is); it resets the patience count when it is lower than the best by more than
``--early-stopping-threshold``, else the count grows by one. The checkpoint records the best
(step, loss), the count and, with ``--save-best``, the best step's prefixes, so that a resumed
run goes on as the uninterrupted one (a checkpoint of an older version: no evaluation yet)."""
from __future__ import annotations

import argparse
from typing import Optional

BEST = "best"  # OUT/best: the best step's prefixes, in the layout of the end result


def option_problem(args: argparse.Namespace) -> Optional[str]:
    """Why ``--save-best`` / ``--early-stopping-*`` cannot work with the other options (None when
    they can); the eval set's own size is checked once it is read (:func:`no_eval_problem`)."""
    if args.early_stopping_threshold is not None and args.early_stopping_patience is None:
        return (f"--early-stopping-threshold {args.early_stopping_threshold}: applies to "
                "--early-stopping-patience N (pass it too, or leave the threshold out)")
    option = _needing_eval(args)
    if option is not None and args.eval_every == 0:
        return f"{option}: needs an eval loss, and --eval-every 0 turns evaluation off (pass --eval-every N > 0)"
    return None


def no_eval_problem(args: argparse.Namespace) -> Optional[str]:
    """The error for ``--save-best`` / ``--early-stopping-patience`` with an empty eval set."""
    option = _needing_eval(args)
    if option is None:
        return None
    source = ("the --eval-data file has no example" if args.eval_data is not None
              else f"--eval-fraction {args.eval_fraction} holds out no example")
    return f"{option}: needs an eval loss, but {source} (pass --eval-data, or a larger --eval-fraction)"


def _needing_eval(args: argparse.Namespace) -> Optional[str]:
    if args.save_best:
        return "--save-best"
    if args.early_stopping_patience is not None:
        return f"--early-stopping-patience {args.early_stopping_patience}"
    return None


class BestSoFar:
    """The lowest eval loss so far (``loss``, at ``step``; None before any evaluation), the
    evaluations since one improved on it by more than ``threshold`` (``waited``), and with
    ``keep`` the prefixes of that step (``prefix``: the checkpoint's ``"prefix"`` layout)."""

    def __init__(self, patience: Optional[int], threshold: float, keep: bool):
        self.patience, self.threshold, self.keep = patience, threshold, keep
        self.loss: Optional[float] = None
        self.step: Optional[int] = None
        self.waited = 0
        self.prefix = None

    @classmethod
    def of_args(cls, args: argparse.Namespace) -> "BestSoFar":
        return cls(args.early_stopping_patience, args.early_stopping_threshold or 0.0, args.save_best)

    def update(self, loss: float, step: int, snapshot) -> bool:
        """Count the evaluation of ``step``; True when it is the best so far (``snapshot()``,
        called then with ``keep``, gives its prefixes)."""
        improved = self.loss is None or self.loss - loss > self.threshold
        self.waited = 0 if improved else self.waited + 1
        if self.loss is not None and loss >= self.loss:
            return False
        self.loss, self.step = loss, step
        self.prefix = snapshot() if self.keep else None
        return True

    @property
    def stopping(self) -> bool:
        """Whether ``--early-stopping-patience`` evaluations in a row did not improve."""
        return self.patience is not None and self.waited >= self.patience

    def stop_note(self, step: int) -> str:
        return (f"stopped early at step {step}: {self.waited} evaluation{'' if self.waited == 1 else 's'} in a row "
                f"did not lower the best eval loss before it by more than {self.threshold:g} "
                f"(--early-stopping-patience {self.patience}); best eval loss {self.loss:.4f} at step {self.step}")

    # -- the checkpoint ------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """The checkpoint's entries: ``best`` (None before any evaluation) and, with ``keep``,
        ``best_prefix``."""
        best = None if self.step is None else {"step": self.step, "eval_loss": self.loss, "waited": self.waited}
        return {"best": best, **({"best_prefix": self.prefix} if self.keep else {})}

    def restore(self, state: dict) -> Optional[str]:
        """Take a checkpoint's best (none in an older one's); the error when ``keep`` asks for
        prefixes the checkpoint's run did not keep (it ran without ``--save-best``)."""
        best = state.get("best")
        if best is None:
            return None
        self.step, self.loss, self.waited = best["step"], best["eval_loss"], best["waited"]
        self.prefix = state.get("best_prefix")
        if self.keep and self.prefix is None:
            return (f"--save-best: the checkpoint of step {state['step']} was made without it: the prefixes "
                    f"of its best step ({self.step}, eval loss {self.loss:.4f}) were not kept; resume "
                    "without --save-best, or start over in another --output")
        return None

    def summary(self, folder: str) -> str:
        """The result line's words on the best step ("" before any evaluation)."""
        if self.step is None:
            return ""
        saved = f": {folder}" if self.keep else ""
        return f"; best eval loss {self.loss:.4f} at step {self.step}{saved}"


def snapshot(modules: dict, multi: bool):
    """A copy on the CPU of the prefixes' state (``{name: state_dict}`` of a multi-task run, the
    one state_dict else): the checkpoint's ``"prefix"`` layout."""
    states = {n: {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()}
              for n, m in modules.items()}
    return states if multi else next(iter(states.values()))


def load(modules: dict, prefix, multi: bool) -> None:
    """Put ``prefix`` (:func:`snapshot`'s layout) into ``modules``, in place."""
    for n, module in modules.items():
        module.load_state_dict(prefix[n] if multi else prefix)


def write_with(modules: dict, prefix, multi: bool, write) -> None:
    """``write()`` with ``prefix`` in ``modules`` for its time, their own state back after."""
    own = snapshot(modules, multi)
    load(modules, prefix, multi)
    try:
        write()
    finally:
        load(modules, own, multi)

