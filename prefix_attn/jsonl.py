"""Reading the JSON-lines files of the command line (training data, generate's requests):
UTF-8 text (a leading byte-order mark dropped), one JSON value per non-blank line, or, for a
``.json`` file, one array of them; every error names ``FILE:LINE`` (and an array item's index). ``error`` is the exception
class the caller reports as a user error (raised with the message alone)."""
from __future__ import annotations

import json
import sys
from typing import List, Optional, Tuple, Type

_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
               int: "a number", float: "a number", type(None): "null"}


def json_type(value) -> str:
    """How a JSON value is called in a message: "an object", "null", ..."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def array_hint(where: str, value) -> str:
    """For an array found where an object was expected, on a line of a ``.jsonl`` file: how to
    give a list of objects instead ("" otherwise)."""
    if isinstance(value, list) and where.split(":", 1)[0].lower().endswith(".jsonl"):
        return " (a .jsonl file holds one object per line; name it .json for one array of objects)"
    return ""


def is_json_path(path: str) -> bool:
    return path.lower().endswith((".jsonl", ".json"))


def read_lines(path: str, error: Type[Exception], what: str = "file") -> List[Tuple[int, str]]:
    """[(line number, text)] of a UTF-8 file (``-``: standard input)."""
    try:
        if path == "-":
            stdin = sys.stdin
            raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8")
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a folder, not a {what}") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from None
    lines = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{path}:{n}: not UTF-8 text (byte 0x{line[exc.start]:02x} at "
                        f"column {exc.start + 1})") from None
        lines.append((n, text.lstrip("\ufeff") if n == 1 else text))
    return lines


def json_values(path: str, lines: List[Tuple[int, str]], error: Type[Exception],
                arrays: bool = False, finite: bool = False) -> List[Tuple[int, object]]:
    """[(line number, value)]: one value per non-blank line; with ``arrays``, a ``.json``
    file holding one array gives its items (each with the line where it starts); with
    ``finite``, NaN / Infinity / numbers beyond a float are refused (values that are written
    back into an output file, which strict JSON readers must read)."""
    return [(line, value) for line, _, value in _values(path, lines, error, arrays, finite)]


def json_records(path: str, lines: List[Tuple[int, str]], error: Type[Exception],
                 arrays: bool = False) -> List[Tuple[str, object]]:
    """[(where, value)] as :func:`json_values`, ``where`` naming each value in messages:
    ``FILE:LINE``, or ``FILE:LINE: array index I`` for an item of a ``.json`` array (all the
    items of a one-line array start on line 1)."""
    return [(f"{path}:{line}" if index is None else f"{path}:{line}: array index {index}", value)
            for line, index, value in _values(path, lines, error, arrays, False)]


class _NonStandard(ValueError):
    """NaN / Infinity / -Infinity (which Python's json reads and strict JSON does not) or a
    number beyond a float (read as inf)."""


def _refuse_constant(name: str):
    raise _NonStandard(f"{name} is not JSON (Python's extension)")


def _loads(text: str):
    """json.loads, refusing NaN / Infinity (1e999 too, read as inf): written back into an
    output file they would make it unreadable to strict JSON readers."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _NonStandard(f"{text} is beyond a float's range")
    return value


def _values(path: str, lines: List[Tuple[int, str]], error: Type[Exception],
            arrays: bool, finite: bool) -> List[Tuple[int, Optional[int], object]]:
    """[(line, array index or None, value)]."""
    dot_json = path.lower().endswith(".json")
    first = next((text.lstrip() for _, text in lines if text.strip()), "")
    if arrays and dot_json and first.startswith("["):
        return _array_items(path, "\n".join(text for _, text in lines), error, finite)
    hint = "; a .json file holds one object per line, or one array of objects" if arrays and dot_json else ""
    values = []
    for n, text in lines:
        if not text.strip():
            continue
        try:
            value = _loads(text) if finite else json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{path}:{n}: not JSON ({exc.msg} at column {exc.colno}){hint}") from None
        except _NonStandard as exc:
            raise error(f"{path}:{n}: {exc}: strict JSON readers of the output would refuse "
                        f"it; write a finite number or a string") from None
        _check_unicode(value, f"{path}:{n}", error)
        values.append((n, None, value))
    return values


def _array_items(path: str, text: str, error: Type[Exception],
                 finite: bool) -> List[Tuple[int, int, object]]:
    """[(line where it starts, index, item)] of a JSON array document."""
    try:
        values = _loads(text) if finite else json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}:{exc.lineno}: not JSON ({exc.msg} at column {exc.colno})") from None
    except _NonStandard as exc:
        raise error(f"{path}: {exc}: strict JSON readers of the output would refuse it; write a "
                    f"finite number or a string") from None
    decoder, items, opening = json.JSONDecoder(), [], text.index("[")
    pos, line = opening + 1, 1 + text.count("\n", 0, opening)
    for index, value in enumerate(values):  # walk the (valid) array again for the line of each item
        start = _skip(text, pos, " \t\r\n,")
        line += text.count("\n", pos, start)
        _check_unicode(value, f"{path}:{line}: array index {index}", error)
        items.append((line, index, value))
        pos = decoder.raw_decode(text, start)[1]
        line += text.count("\n", start, pos)
    return items


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _check_unicode(value, where: str, error: Type[Exception]) -> None:
    """A user error for a string of ``value`` (keys included) holding a lone surrogate (JSON
    allows the escape "\\ud800"; the text is not Unicode and cannot be tokenized)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise error(f"{where}: a string holds a lone surrogate (\\u{ord(v[exc.start]):04x}), "
                            "not valid Unicode text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)

