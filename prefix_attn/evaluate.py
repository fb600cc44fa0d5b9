"""prefix-attn eval: the loss of a data file under each prefix, without training.

After ``prefix-attn train``, compare adapters (and the base model without a prefix) on held-out
data:

    prefix-attn eval heldout.jsonl --model out/base_model --adapter a=out/adapter \\
        --adapter b=other/adapter --prefix none --prefix a --prefix b

The data is read, tokenised, cut and masked exactly as ``prefix-attn train`` reads its data
(a ``.jsonl``/``.json`` file of ``{"text"}`` or ``{"prompt", "completion"}`` examples, the loss
on the completion only, or plain text, one example a line; with ``--chat``, as ``train --chat``
renders them, ``--chat-turns`` and ``--chat-option`` as train's), and the loss is train's eval
loss: the mean over the learnt tokens (token-weighted), in batches of ``--batch-size`` examples
of similar length, longest first. With the same data, model, ``--batch-size`` and
``--max-length`` it is the ``eval_loss`` that ``train --eval-data`` logs for the prefix.

Prefixes come as generate's do: ``--adapter NAME=DIR`` (a PEFT prefix-tuning adapter, e.g.
``OUT/adapter``), ``--bank DIR`` (a saved bank: each entry a prefix, e.g. a multi-task run's
``OUT/bank``) and ``--prompt-prefix NAME=TEXT`` (a prompt's KV; the examples after it are
tokenised without the start token, which the prompt holds). Each example
is scored under its ``"prefix"`` field when it has one (a name given by those options), else
under each ``--prefix NAME`` (repeatable: every such example under every one, for comparison;
``none`` is the base model without a prefix), else under the one prefix given, or under none
when no prefix is given at all; data with examples that name no prefix and several prefixes
given without ``--prefix`` is an error; a ``--prefix`` that scores no example (every example
names its own) gets a note.

Output: a table on standard output, one line per prefix scored: the examples (rows, under
``--chat-turns each``), the learnt tokens, the loss, its perplexity (exp of the loss) and, when
``none`` was scored too, the change of the loss against it (negative: the prefix helps). With
``--output FILE`` the same numbers go to FILE as JSON (``{"data": ..., "model": ...,
"max_length": N, "prefixes": {NAME: {"examples", "tokens", "loss", "perplexity",
"delta_loss"}}}``, ``delta_loss`` only beside ``none``), written whole or not at all.

With ``--chat`` a ``--prompt-prefix`` is the system message, as generate --chat serves it: its
entry holds the KV of the template's rendering of [system: TEXT] alone, and an example scored
under it is its conversation rendered with that system message first (as ``train --chat``
renders it, the same assistant turns scored) less that head, which must be its first tokens:
its loss is the model's on the whole conversation with that system message and no prefix.
This compares a trained prefix with giving its instruction as a system prompt:

    prefix-attn eval heldout.jsonl --chat --model M --adapter tuned=out/adapter \\
        --prompt-prefix sys="You are ..." --prefix tuned --prefix sys --prefix none

A template that renders the system message differently once a user turn follows (one folding
it into the first user turn, or merging its last token with the next) is refused, naming every
such example (use a system message in the data, scored with ``--prefix none``, instead); so is
an example with a system message of its own scored under a prompt prefix (before the model
loads), and a ``--bank`` entry that is a prompt's KV (it keeps no text to render).

``--max-length`` defaults to train's 256, lowered to the model's positions less the longest
prefix scored (the tokens after a prefix are numbered from its length); a larger N given is an
error. Errors in the data (as train reports them), unknown prefix names, bad options and an
output that is a folder are reported as ``prefix-attn eval: error: ...`` (exit status 2),
before the model loads where they can be; nothing is written then. An adapter trained on
another base model gets generate's warning.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from . import atomic, cli_args, cli_parsers, serve, tiny, train_chat, train_prefixes
from .bank_names import did_you_mean, some_names
from .chat import options_need_chat
from .serve_inputs import RequestError, Source, prefix_sources, warn_about_adapter_bases
from .train_data import prepare, read_examples_at
from .train_state import TrainError, speaking_as, warn

PROG = "prefix-attn eval"
NONE = cli_parsers.NO_PREFIX


class EvalError(ValueError):
    """A user error: reported as ``prefix-attn eval: error: ...`` with exit status 2."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object."""
    return cli_parsers.add_parser(subparsers, "eval", run)


# -- which prefix each example is scored under -------------------------------------------------

def scored_prefixes(named: Dict[str, Optional[str]], wanted: List[str], sources: List[Source],
                    path: str, n_examples: int) -> List[Optional[str]]:
    """The prefixes an example without a ``"prefix"`` field is scored under, None for no prefix
    (``named``: the data's :func:`prefix_attn.train_prefixes.read_prefixes`, None where an
    example names none): ``wanted`` (``--prefix``, ``none`` for None), else the one source (even
    one named ``none``), else None when no source is given. Checks every name the data and
    ``wanted`` give against the sources."""
    known = [s.name for s in sources]
    if NONE in wanted and NONE in known:
        raise EvalError(f"--prefix {NONE} means no prefix, but a prefix is named {NONE!r} too "
                        f"({next(s for s in sources if s.name == NONE)}): rename that one")
    unknown = [n for n in wanted if n != NONE and n not in known]
    if unknown:
        raise EvalError(f"--prefix {unknown[0]}: unknown prefix{did_you_mean(unknown[0], known)}; "
                        + _known(known))
    bad = [f"{where}: unknown prefix {name!r}{did_you_mean(name, known)}"
           for where, name in named.items() if name is not None and name not in known]
    if bad:
        from .serve_inputs import refusal

        raise EvalError(str(refusal(f"{len(bad)} example(s) name a prefix not given; " + _known(known), bad)))
    unnamed = n_examples - sum(name is not None for name in named.values())
    if wanted and not unnamed:  # the user asked for a comparison that has nothing to compare
        warn("note", f"--prefix {' --prefix '.join(dict.fromkeys(wanted))} scores no example: every example "
                     f"of {path} names its own prefix (its \"prefix\" field), and --prefix applies to those "
                     "naming none; to score the data under another prefix, or none, drop the field")
    if wanted or not unnamed:
        return [None if n == NONE else n for n in dict.fromkeys(wanted)]
    if len(known) > 1:
        raise EvalError(f"{unnamed} example(s) of {path} name no prefix and {len(known)} are given "
                        f"{some_names(known)}: say which to score them under with --prefix NAME "
                        f"(repeatable; --prefix {NONE}: without a prefix)")
    return known or [None]


def _known(known: List[str]) -> str:
    if not known:
        return "no prefix was given: give it with --adapter NAME=DIR, --bank DIR or --prompt-prefix NAME=TEXT"
    return f"known prefixes: {some_names(known)} (and --prefix {NONE}: no prefix)"


# -- the scores -----------------------------------------------------------------------------------

@dataclass
class Score:
    """One prefix's numbers (``prefix`` None: no prefix, shown as ``none``): its rows (ids,
    labels), and once scored their learnt tokens and mean token loss."""

    prefix: Optional[str]
    rows: List[tuple] = field(default_factory=list)
    tokens: int = 0
    loss: float = float("nan")

    @property
    def label(self) -> str:
        return NONE if self.prefix is None else self.prefix

    def as_json(self, base: Optional["Score"]) -> dict:
        record = {"examples": len(self.rows), "tokens": self.tokens, "loss": _finite(self.loss),
                  "perplexity": _finite(perplexity(self.loss))}
        if base is not None and base is not self:
            record["delta_loss"] = _finite(self.loss - base.loss)
        return record


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def _finite(value: float) -> Optional[float]:
    return value if math.isfinite(value) else None  # JSON has no NaN / Infinity


def learnt_tokens(rows) -> int:
    """The tokens the loss is taken on: each row's labels other than -100 after its first."""
    return sum(sum(label != -100 for label in row[1][1:]) for row in rows)


def group_rows(rows: List[tuple], default: List[Optional[str]]) -> Dict[Optional[str], Score]:
    """{prefix: its Score}: a row (ids, labels, its example's ``"prefix"`` or None) under its
    example's prefix, else under each of ``default``; in the order of ``default``, then of the
    names examples give (sorted)."""
    scores = {name: Score(name) for name in default}
    for name in sorted({row[2] for row in rows if row[2] is not None}):
        scores.setdefault(name, Score(name))
    for ids, labels, own in rows:
        for name in ([own] if own is not None else default):
            scores[name].rows.append((ids, labels))
    return {name: s for name, s in scores.items() if s.rows}


def _scored_under(named: Dict[str, Optional[str]], default: List[Optional[str]]):
    """``where`` -> the prefixes its example is scored under: its own, else each of ``default``."""
    return lambda where: [named[where]] if named.get(where) is not None else default


def scores_by_rendering(examples: list, named: Dict[str, Optional[str]], default: List[Optional[str]],
                        system_of, rows_of) -> List[Score]:
    """The Scores of :func:`group_rows`, in its order, each prefix's rows rendered as it needs:
    ``system_of(prefix)`` is None for the plain rendering, else the prompt prefix that is the
    system message of its conversations (``--chat``); ``rows_of(examples, system)`` makes the
    rows of the examples scored under such prefixes, each example rendered once a rendering."""
    under = _scored_under(named, default)
    order = default + sorted({n for n in named.values() if n is not None})
    scores: Dict[Optional[str], Score] = {}
    for system in dict.fromkeys(system_of(p) for p in order):
        some = [e for e in examples if any(system_of(p) == system for p in under(e[0]))]
        if some:
            rows = rows_of(some, system)
            scores.update(group_rows(rows, [p for p in default if system_of(p) == system]))
    return sorted(scores.values(), key=lambda s: order.index(s.prefix))


def check_no_own_system(examples: list, under, systems: Dict[str, str]) -> None:
    """Under ``--chat``, no example scored under a ``--prompt-prefix`` (``systems``: name -> its
    text, the system message) has a system message of its own, as generate --chat refuses such a
    request (before the model loads); ``under(where)``: the prefixes an example is scored under.
    Every such example named in one error."""
    if not systems:
        return
    bad = []
    for where, messages, _ in examples:
        prompts = [p for p in under(where) if p in systems]
        if prompts and messages[0]["role"] == "system":
            bad.append(f"{where}: 'messages' starts with a system message, but prefix {prompts[0]!r} is the "
                       "system message; leave one of them out (or score the example under another prefix)")
    if bad:
        from .serve_inputs import refusal

        raise EvalError(str(refusal(f"{len(bad)} example(s) that --chat cannot score after a --prompt-prefix:", bad)))


def without_start(rows: List[tuple], start: List[int]) -> List[tuple]:
    """The rows without the ``start`` tokens they begin with (the tokenizer's start token: a
    prompt prefix's KV holds its own, and the text after it continues the prompt)."""
    n = len(start)
    return [(ids[n:], labels[n:]) if n and ids[:n] == start else (ids, labels) for ids, labels in rows]


def start_tokens(tokenizer) -> List[int]:
    """The tokens the tokenizer puts before a text when asked for its special tokens."""
    with_special, plain = tiny.encode(tokenizer, "a", special=True), tiny.encode(tokenizer, "a", special=False)
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def score_rows(model, score: Score, batch_size: int, pad_id: int, prefix: Optional[str], device, bar) -> None:
    """``score``'s token-weighted mean loss under bank entry ``prefix`` (None: no prefix), in
    the batches train's evaluation makes (rows sorted longest first, ``batch_size`` each):
    :func:`prefix_attn.train.evaluate` of each batch, weighted by its learnt tokens."""
    from .train import evaluate

    order = sorted(score.rows, key=lambda row: -len(row[0]))
    total, count = 0.0, 0
    for i in range(0, len(order), batch_size):
        batch = order[i:i + batch_size]
        n = learnt_tokens(batch)
        total += evaluate(model, batch, batch_size, pad_id, prefix, device) * n
        count += n
        bar.update(len(batch))
    score.tokens, score.loss = count, total / max(count, 1)


# -- output -----------------------------------------------------------------------------------

def table(scores: List[Score]) -> str:
    """The lines printed: prefix, examples, tokens, loss, perplexity (and the change of the loss
    against ``none`` when that was scored)."""
    base = next((s for s in scores if s.prefix is None), None)
    head = ["prefix", "examples", "tokens", "loss", "perplexity"] + (["vs none"] if base else [])
    rows = [[s.label, str(len(s.rows)), str(s.tokens), f"{s.loss:.4f}", f"{perplexity(s.loss):.4g}"]
            + ([f"{s.loss - base.loss:+.4f}" if s is not base else "-"] if base else []) for s in scores]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
                     for r in [head] + rows)


def check_output(path: Optional[str]) -> None:
    """``--output`` names a file (before the model loads)."""
    if path is None:
        return
    if not path or os.path.isdir(path) or path.endswith(tuple(s for s in (os.sep, os.altsep) if s)):
        raise EvalError(f"--output {path!r}: give a file name, not a folder")


def write_json(path: str, args: argparse.Namespace, max_length: int, scores: List[Score]) -> None:
    base = next((s for s in scores if s.prefix is None), None)
    record = {"data": args.data, "model": args.model, "max_length": max_length,
              "prefixes": {s.label: s.as_json(base) for s in scores}}
    atomic.make_folders(os.path.dirname(os.path.abspath(path)))
    atomic.write_text(path, json.dumps(record, indent=2, allow_nan=False) + "\n")


# -- the command ------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Run ``eval`` from parsed arguments; returns the exit code (2 on a user error)."""
    try:
        with cli_args.transformers_progress(enabled=not args.no_progress), speaking_as(PROG):
            return _run(args)
    except (EvalError, TrainError, RequestError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the JSON output could not be written
        print(f"{PROG}: error: cannot write --output {args.output!r}: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _check_options(args: argparse.Namespace):
    """The device, the backend switch and the --chat options; returns the device."""
    device, problem = cli_args.device_problem(args.device)
    problem = problem or cli_args.env_problem(device.type if device else None, "evaluation")
    problem = problem or options_need_chat(args.chat_option, args.chat)
    if problem is None and args.chat_turns != "last" and not args.chat:
        problem = f"--chat-turns {args.chat_turns}: chooses the assistant turns scored under --chat"
    if problem is not None:
        raise EvalError(problem)
    check_output(args.output)
    return device


def _max_length(requested: Optional[int], model, bank, prefixes: List[Optional[str]]) -> int:
    """--max-length: at most the model's positions less the longest prefix scored (None: no prefix)."""
    wanted = cli_parsers.DEFAULT_MAX_LENGTH if requested is None else requested
    positions = cli_args.max_positions(model.config)
    if positions is None:
        return wanted
    longest = max(prefixes, key=lambda p: bank.entry_len(p) if p is not None else 0)
    P = bank.entry_len(longest) if longest is not None else 0
    room = positions - P
    if room < 2:
        raise EvalError(f"the model numbers {positions} positions: prefix {longest} takes {P} of them")
    if requested is not None and requested > room:
        raise EvalError(f"--max-length {requested}: the model numbers {positions} positions and prefix "
                        f"{longest} takes {P}: at most {room}")
    return min(wanted, room)


def _run(args: argparse.Namespace) -> int:
    from .progress import progress_bar

    device = _check_options(args)
    sources = prefix_sources(args)
    examples = (train_chat.read_examples_at if args.chat else read_examples_at)(args.data)
    named = train_prefixes.read_prefixes(args.data, None)
    default = scored_prefixes(named, args.prefix, sources, args.data, len(examples))
    chat = (train_chat.ChatExamples.of_model(args.model, dict(args.chat_option), args.chat_turns)
            if args.chat else None)
    systems = {s.name: s.value for s in sources if s.option == "--prompt-prefix"} if chat is not None else {}
    check_no_own_system(examples, _scored_under(named, default), systems)
    warn_about_adapter_bases(sources, args.model, "eval")

    try:
        served = serve.load(args, device, sources, command="eval")
    except (ValueError, FileNotFoundError) as exc:  # an adapter or bank that does not fit, missing files
        raise EvalError(str(exc)) from None
    bank, model = served.bank, served.model
    wanted = default + sorted({n for n in named.values() if n is not None})
    if chat is not None:
        prompts = [n for n in wanted if n is not None and n not in systems and bank.kind(n) == "prompt"]
        if prompts:
            raise EvalError(f"--bank {args.bank}: entry {prompts[0]!r} is a prompt's KV, which keeps no text to "
                            f"render as the system message under --chat: give it as --prompt-prefix "
                            f"{prompts[0]}=TEXT")
    max_length = _max_length(args.max_length, model, bank, wanted)
    vocab_size = model.get_input_embeddings().num_embeddings

    def rows_of(some: list, system: Optional[str]) -> List[tuple]:  # rendered after prompt prefix system
        rendering = chat if system is None else chat.after_system(system, systems[system], served.prompt_ids[system])
        return prepare(served.tokenizer, some, max_length, vocab_size, args.data, what="data",
                       chat=rendering, progress=not args.no_progress, prefix_of=lambda where: named.get(where),
                       cap="the longest prefix scored")

    scores = scores_by_rendering(examples, named, default, lambda name: name if name in systems else None, rows_of)
    if chat is None:
        start = start_tokens(served.tokenizer)
        for s in scores:
            if s.prefix is not None and bank.kind(s.prefix) == "prompt":
                s.rows = without_start(s.rows, start)
    pad_id = served.pad_id if served.pad_id is not None else 0
    with progress_bar(sum(len(s.rows) for s in scores), "eval", "example", enabled=not args.no_progress) as bar:
        for s in scores:
            score_rows(model, s, args.batch_size, pad_id, s.prefix, device, bar)
    if args.output is not None:
        write_json(args.output, args, max_length, scores)
    print(table(scores))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``prefix-attn eval ...`` as a function (``argv`` without the subcommand name)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=cli_args.HelpFormatter)
    cli_parsers.eval_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
