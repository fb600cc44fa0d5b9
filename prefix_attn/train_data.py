"""``prefix-attn train``'s data: examples read from a JSON-lines / JSON / text file, tokenised
into (ids, labels) rows (the loss on the completion only), cut to ``--max-length`` (what is cut
or dropped said once), and batched: padded rows or one packed row, in a seeded order per epoch,
with a seeded held-out split. ``--chat`` examples come from :mod:`prefix_attn.train_chat`."""
from __future__ import annotations

import json
import random
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import jsonl, tiny, train_chat
from .train_state import TrainError, warn


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
    if obj.get("tools") is not None:  # not to be dropped silently (null: no tools)
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


ENCODE_CHUNK = 1024  # texts per call of a fast tokenizer (its Rust side encodes them in parallel)
PROGRESS_DELAY = 1.0  # seconds of tokenising before its progress bar shows


def encode_examples(tokenizer, examples: Sequence[Tuple[str, str]]) -> List[Tuple[List[int], List[int]]]:
    """:func:`encode_example` of each (prompt, completion), the same ids, faster: a fast HF
    tokenizer (``is_fast``) gets the texts a chunk at a time, which it encodes on every core;
    any other tokenizer one text at a time."""
    if not getattr(tokenizer, "is_fast", False):
        return [encode_example(tokenizer, p, c) for p, c in examples]
    eos = getattr(tokenizer, "eos_token_id", None)
    prompts = _encode_many(tokenizer, [p for p, _ in examples if p], special=True)
    # a completion gets the start token only when there is no prompt
    after = _encode_many(tokenizer, [c for p, c in examples if p], special=False)
    alone = _encode_many(tokenizer, [c for p, c in examples if not p], special=True)
    rows = []
    for p, _ in examples:
        prompt, completion = (next(prompts), next(after)) if p else ([], next(alone))
        completion = completion + [eos] if eos is not None else completion
        rows.append((prompt + completion, [-100] * len(prompt) + completion))
    return rows


def _encode_many(tokenizer, texts: List[str], special: bool):
    """An iterator over the ids of ``texts`` (lists of ints), as :func:`tiny.encode` gives them."""
    for start in range(0, len(texts), ENCODE_CHUNK):
        yield from (list(ids) for ids in
                    tokenizer(texts[start:start + ENCODE_CHUNK], add_special_tokens=special)["input_ids"])


def has_target(labels: Sequence[int]) -> bool:
    """Whether a row has a token to learn: a label other than -100 after the first position
    (the first token is never predicted)."""
    return any(label != -100 for label in labels[1:])


def prepare(tokenizer, examples_at: Sequence[Tuple[str, str, str]], max_length: int,
            vocab_size: int, path: str, what: str = "data file",
            chat: Optional[train_chat.ChatExamples] = None,
            progress: bool = False, prefix_of: Optional[Callable[[str], str]] = None,
            cap: str = "--num-virtual-tokens") -> List[tuple]:
    """(ids, labels) rows of ``read_examples_at``'s examples of ``path`` (:func:`encode_example`;
    with ``chat``, its rows of ``train_chat.read_examples_at``'s conversations), truncated to
    ``max_length``, checked: a token id
    outside the model's ``vocab_size`` is a :class:`TrainError` naming the example; examples left
    with no token to learn (the prompt fills ``max_length``, or under two tokens) are dropped
    with one warning giving their count and cause, and an error when none is left. An example
    with neither prompt nor text (``{"text": ""}``, blanks only) is dropped too, as a blank line
    of a text file is: it would teach the model to end every text at once. Under ``--chat-turns
    each`` an example makes a row per assistant turn, and the messages count rows. ``progress``:
    a bar on standard error while tokenising takes over a second. ``prefix_of``: a multi-task
    run's prefix of each example (given its ``where``; a turn's row, its example's), the third
    item of its row. ``cap``: what else caps ``max_length`` in the messages (train's
    ``--num-virtual-tokens``; eval's longest prefix)."""
    out, cut, short, blank, shortened = [], 0, 0, 0, 0
    rows = _rows(tokenizer, examples_at, chat, progress)
    unit, of_all = _counted_as(len(rows), len(examples_at), chat)
    for where, row in rows:
        if row is None:
            blank += 1
            continue
        ids, labels = row
        problem = tiny.vocab_problem(tokenizer, ids, vocab_size)
        if problem is not None:
            raise TrainError(f"{where}: {problem}")
        if has_target(labels[:max_length]):
            kept = (ids[:max_length], labels[:max_length])
            out.append(kept if prefix_of is None else (*kept, prefix_of(train_chat.example_of(where))))
            shortened += any(label != -100 for label in labels[max_length:])  # a learnt token cut
        elif has_target(labels):
            cut += 1
        else:
            short += 1
    if shortened:  # kept, but the end of their answer (the end-of-text / end-of-turn) is not learnt
        lost = ("the assistant turns after the cut, and the end of the turn it cuts, its end-of-turn "
                "token included" if chat is not None and chat.turns == "all" else
                "the end-of-text or end-of-turn token, and the end of the completion before it where the "
                "cut reaches it")
        warn("note", f"{path}: {shortened} of {of_all} "
                     f"{'is' if shortened == 1 else 'are'} longer than the {max_length}-token limit per "
                     f"{unit} (--max-length): cut, so {'its' if shortened == 1 else 'their'} last tokens "
                     f"to learn ({lost}) are not learnt")
    if cut or short or blank:
        causes = []
        if blank:
            causes.append(f"{blank} {'is' if blank == 1 else 'are'} empty (no text, or blanks only)")
        if cut:
            causes.append(f"in {cut} the prompt fills the {max_length}-token limit per example "
                          f"(--max-length, at most the model's positions less {cap}) "
                          f"and truncation cuts off the whole completion (raise --max-length if the "
                          f"model allows, or shorten the prompts)")
        if short:
            causes.append(f"{short} {'is' if short == 1 else 'are'} under two tokens (nothing to predict)")
        dropped = cut + short + blank
        summary = (f"{path}: {dropped} of {of_all} "
                   f"{'has' if dropped == 1 else 'have'} no token to learn: " + "; ".join(causes))
        if not out:
            raise TrainError(f"{summary}; no {unit} of the {what} is left to train on"
                             if what == "data file" else f"{summary}; no {unit} of the {what} is left")
        warn("warning", f"{summary}; dropped")
    return out


def _counted_as(n_rows: int, n_examples: int, chat) -> Tuple[str, str]:
    """(what one row is called, all of them counted) in :func:`prepare`'s messages: the examples,
    but under ``--chat-turns each`` the rows, one per assistant turn of the examples."""
    if chat is None or chat.turns != "each":
        return "example", f"{n_examples} example{'' if n_examples == 1 else 's'}"
    return "row", (f"{n_rows} row{'' if n_rows == 1 else 's'} (--chat-turns each: one per assistant turn "
                   f"of the {n_examples} example{'' if n_examples == 1 else 's'})")


def _rows(tokenizer, examples_at, chat, progress: bool) -> List[Tuple[str, Optional[Tuple[List[int], List[int]]]]]:
    """[(where, (ids, labels) or None for an empty example)], under a progress bar that shows
    once tokenising takes over a second (hundreds of thousands of examples take minutes)."""
    from .progress import progress_bar

    with progress_bar(len(examples_at), "tokenising", "example", enabled=progress, delay=PROGRESS_DELAY) as bar:
        if chat is not None:  # one conversation at a time: the bar follows it
            return chat.rows(_counted(examples_at, bar))
        rows: list = []
        for start in range(0, len(examples_at), ENCODE_CHUNK):
            chunk = examples_at[start:start + ENCODE_CHUNK]
            kept = [(p, c) for _, p, c in chunk if p or c.strip()]
            encoded = iter(encode_examples(tokenizer, kept))
            rows += [(w, next(encoded) if p or c.strip() else None) for w, p, c in chunk]
            bar.update(len(chunk))
        return rows


def _counted(items, bar):
    """``items``, one by one, the bar moved after each."""
    for item in items:
        yield item
        bar.update(1)


def collate(rows: Sequence[tuple], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` LongTensors ``[B, S]`` of
    (ids, labels) rows (a multi-task run's third item, the prefix, is the caller's)."""
    S = max(len(row[0]) for row in rows)
    B = len(rows)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    labels = torch.full((B, S), -100, dtype=torch.long)
    for b, (i, l, *_) in enumerate(rows):
        ids[b, :len(i)] = torch.tensor(i)
        mask[b, :len(i)] = 1
        labels[b, :len(l)] = torch.tensor(l)
    return ids, mask, labels


def collate_packed(rows: Sequence[tuple]):
    """The rows packed into one sequence without padding: ``input_ids``, ``position_ids``
    (restarting at every example, which is how transformers finds the packed sequences) and
    ``labels`` ``[1, T]``, the first label of every example -100 (no prediction across
    examples). The loss is the padded batch's: the same tokens are predicted."""
    ids, pos, labels = [], [], []
    for i, l, *_ in rows:
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


def eval_cost_note(n_eval: int, eval_every: int, examples_per_step: int, unit: str = "example") -> Optional[str]:
    """A note when each evaluation (a forward pass over the ``n_eval`` held-out examples, every
    ``eval_every`` steps) reads over twice the examples that the steps between two evaluations
    train on: a forward pass is about half a training step's work, so evaluating would then
    take longer than training (10% of 200k examples held out, evaluated every 50 steps of 8:
    20000 examples per 400 trained). None when it costs less. ``unit``: what is counted ("row"
    under ``--chat-turns each``: a row per assistant turn)."""
    trained = eval_every * examples_per_step
    if eval_every <= 0 or n_eval <= 2 * trained:
        return None
    every = "every step" if eval_every == 1 else f"every {eval_every} steps"
    return (f"each evaluation reads the {n_eval} held-out {unit}s, and one comes {every} ({trained} "
            f"{unit}{'' if trained == 1 else 's'} trained): evaluating will take longer than training; pass "
            f"a smaller --eval-fraction, a larger --eval-every, or a smaller --eval-data file")

