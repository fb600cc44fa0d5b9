"""``prefix-attn train``'s prefixes: the ``"prefix"`` field of each JSON example (null or
missing: ``--name``'s prefix). A data file that names more than one prefix makes a multi-task
run: one prefix per name, each row of a batch under its own, written as ``OUT/adapters/NAME``
and ``OUT/bank``; its eval examples may only use prefixes that have training examples."""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Sequence, Set

from . import cli_parsers, jsonl
from .bank_names import check_name, some_names
from .train_state import TrainError

ADAPTERS = "adapters"  # OUT/adapters/NAME: a multi-task run's PEFT adapters, one per prefix
BANK = "bank"  # OUT/bank: all of them in one PrefixBank.save folder, for generate --bank
_NAME_BYTES = 200  # a folder name's room (255 bytes on common file systems) less the atomic writer's


def read_prefixes(path: str, default: str, what: str = "data file") -> Dict[str, str]:
    """{where: prefix name} of every example of ``path`` (``where`` as the example readers name
    them: ``path:line``, and an array item's index), ``default`` where an example gives none;
    {} for a plain-text file (every example is ``default``'s). A bad name is a
    :class:`TrainError` naming the example. Read after the examples, whose errors come first."""
    if not jsonl.is_json_path(path):
        return {}
    lines = jsonl.read_lines(path, TrainError, what=what)
    names = {}
    for where, obj in jsonl.json_records(path, lines, TrainError, arrays=True):
        value = obj.get("prefix") if isinstance(obj, dict) else None
        names[where] = default if value is None else _checked(where, value)
    return names


def _checked(where: str, value) -> str:
    """``value`` of an example's ``"prefix"``: a name the bank takes, ``generate --adapter
    NAME=DIR`` can give, and that can name the folder ``OUT/adapters/NAME``."""
    if not isinstance(value, str):
        raise TrainError(f"{where}: field 'prefix' must be a string naming the prefix to train (null or "
                         f"missing: --name's), got {jsonl.json_type(value)}")
    try:
        check_name(value)
        cli_parsers.prefix_name(value)
    except (TypeError, argparse.ArgumentTypeError) as exc:
        raise TrainError(f"{where}: field 'prefix': {exc}") from None
    problem = folder_problem(value)
    if problem is not None:
        raise TrainError(f"{where}: field 'prefix': {problem}")
    return value


def folder_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot name the folder ``OUT/adapters/NAME`` (None when it can)."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        return (f"the prefix name {name!r} cannot name its adapter folder {ADAPTERS}/NAME "
                "(no '/', '\\', NUL character, '.' or '..')")
    if len(name.encode("utf-8")) > _NAME_BYTES:
        return f"the prefix name {name[:20]!r}... is over {_NAME_BYTES} bytes, too long for its adapter folder"
    return None


def names_of(named: Dict[str, str], default: str) -> List[str]:
    """The prefixes a data file names, sorted (``default`` for a plain-text file)."""
    return sorted(set(named.values())) or [default]


def check_run_names(names: Sequence[str], default: str) -> None:
    """A multi-task run's prefixes can name their adapter folders: ``--name`` too (when some
    example uses it), and no two names differing in case only (one folder on a file system
    that ignores case, as macOS's and Windows' do)."""
    if default in names:
        problem = folder_problem(default)
        if problem is not None:
            raise TrainError(f"--name: {problem} (the data names several prefixes)")
    seen: Dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            raise TrainError(f"the prefix names {other!r} and {name!r} differ in case only: their adapter "
                             f"folders {ADAPTERS}/NAME would be one on a file system that ignores case; "
                             "rename one")


def prefix_of(named: Dict[str, str], default: str) -> Callable[[str], str]:
    """The prefix of the example named ``where`` in a file whose :func:`read_prefixes` is
    ``named``: its own, or ``default`` for every example of a plain-text file (``named`` {}:
    an ``--eval-data`` text file of a multi-task run; its examples name none)."""
    return lambda where: named[where] if named else default


def row_prefix(row, default: str) -> str:
    """The prefix of a data row: its third item, in a multi-task run; ``default`` otherwise."""
    return row[2] if len(row) > 2 else default


def check_eval_names(trained: Set[str], eval_rows, default: str, eval_named: Optional[Dict[str, str]],
                     eval_file: Optional[str], unit: str = "example") -> None:
    """Every eval example's prefix is one of the ``trained`` (else it would stay untrained, its
    eval loss that of its random start). ``eval_named``: the ``--eval-data`` file's
    :func:`read_prefixes` (None: ``eval_rows`` were held out of the data, ``unit`` each: "row"
    under ``--chat-turns each``)."""
    if eval_named is None:
        missing = sorted({row_prefix(row, default) for row in eval_rows} - trained)
        if missing:
            raise TrainError(f"every {unit} of prefix {missing[0]!r} is held out for eval (--eval-fraction of "
                             f"the data, drawn by --seed): it would stay untrained; give it more examples, a "
                             f"smaller --eval-fraction, or an --eval-data file")
        return
    for where, name in (eval_named.items() if eval_named else
                        [(f"{eval_file} (plain text: its examples are --name's)", default)]):
        if name not in trained:
            raise TrainError(f"{where}: prefix {name!r} has no training example (the prefixes trained: "
                             f"{some_names(sorted(trained))}): it would stay untrained; --eval-data may "
                             f"only use prefixes the data trains")


def check_all_trained(names: Sequence[str], trained: Set[str], path: str) -> None:
    """Every prefix the data names has a row left to train on: one whose examples were all
    dropped (no token to learn: empty, or the prompt fills --max-length) would be written
    untrained, its random start served as a trained adapter."""
    untrained = [n for n in names if n not in trained]
    if untrained:
        raise TrainError(f"{path}: every example of prefix {untrained[0]!r} was dropped (no token to learn: "
                         f"see the warning above): it would stay untrained; fix its examples, or leave them "
                         f"out" + (f" (prefixes without a row to train: {some_names(untrained)})"
                                   if len(untrained) > 1 else ""))


def unseen_names(names: Sequence[str], data, default: str, steps_per_epoch: int, total: int,
                 step_size: int, seed: int) -> List[str]:
    """The ``names`` no row of the run's ``total`` steps uses (the batches of
    :func:`prefix_attn.train_data.batch_order`): a short ``--max-steps`` can leave a prefix
    untrained. Stops looking once every name is seen."""
    from .train_data import batch_order

    left = set(names)
    for step in range(total):
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0 or step == 0:
            order = batch_order(len(data), step_size, seed, epoch)
        left -= {row_prefix(data[i], default) for i in order[index]}
        if not left:
            break
    return sorted(left)


def check_checkpoint_names(state: dict, names: Optional[List[str]], ckpt_path: str) -> None:
    """A resumed run trains the checkpoint's prefixes: ``names`` of a multi-task run, None of a
    single-prefix one (whose ``--name`` may change, as before)."""
    held = state.get("prefixes")
    if held == names:
        return
    if held is None:  # no --name makes data naming several prefixes train one
        raise TrainError(f"--resume: {ckpt_path} trains one prefix, but this data names {_shown(names)} "
                         "(a prefix-attn older than multi-task runs read no \"prefix\" field): it cannot "
                         "continue that run; start a new --output (or leave the \"prefix\" fields out to "
                         "continue the one prefix)")
    raise TrainError(f"--resume: {ckpt_path} trains {_shown(held)}, this run {_shown(names)} (the data's "
                     f"\"prefix\" fields, and --name for examples without one): resume with the "
                     f"checkpoint's --name")


def _shown(names: Optional[List[str]]) -> str:
    return "one prefix" if names is None else f"the prefixes {some_names(names)}"
