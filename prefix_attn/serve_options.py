"""Per-request decoding settings of ``prefix-attn generate``. A request line may set
``max_new_tokens`` (or OpenAI's ``max_tokens`` / ``max_completion_tokens``, the same number),
``stop`` (a string or an array of strings), ``do_sample``, ``temperature``, ``top_p``,
``top_k``, ``min_p``, ``repetition_penalty`` and ``num_beams``: each overrides the command's
option of the same name for that request; a field that is null or missing leaves the option's
value. :func:`parse_fields` checks the values with the options' own parsers
(:data:`prefix_attn.cli_parsers.DECODING_TYPES`); :class:`Decoding` is what one request runs
with, and requests of equal :attr:`Decoding.key` share ``model.generate`` calls. Imports
neither torch nor transformers."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from . import jsonl
from .cli_parsers import DECODING_TYPES

# a request field -> the setting it gives (the option's argparse dest)
FIELDS = {"max_new_tokens": "max_new_tokens", "max_tokens": "max_new_tokens",
          "max_completion_tokens": "max_new_tokens", "stop": "stop", "do_sample": "do_sample",
          "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "num_beams": "num_beams"}

# the settings only sampling uses (greedy decoding and beam search leave them unused)
SAMPLING = ("temperature", "top_p", "top_k", "min_p")


def parse_fields(obj: dict, where: str) -> Tuple[Dict[str, Any], List[str]]:
    """The settings (argparse dest -> value) that the decoding fields of request ``obj`` give, a
    null field giving none, and one problem per bad field (``where: 'field': what is wrong``,
    as the option's usage error says it)."""
    settings: Dict[str, Any] = {}
    named: Dict[str, str] = {}  # setting -> the field that gave it
    problems = []
    for name, value in obj.items():
        if name not in FIELDS or value is None:
            continue
        dest = FIELDS[name]
        if dest in named:
            problems.append(f"{where}: {named[dest]!r} and {name!r} both give {dest}: give one")
            continue
        named[dest] = name
        if dest == "temperature" and _is_zero(value):  # OpenAI's greedy decoding
            continue
        try:
            settings[dest] = _value(dest, value)
        except ValueError as exc:
            problems.append(f"{where}: {name!r}: {exc}")
    problem = _sampling_by_temperature(obj, settings)
    if problem is not None:
        problems.append(f"{where}: {problem}")
    return settings, problems


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0


def _sampling_by_temperature(obj: dict, settings: Dict[str, Any]) -> Optional[str]:
    """A request's ``"temperature"`` decides whether it samples, as OpenAI's API does, unless
    it gives ``"do_sample"``: 0 is greedy decoding, above 0 sampling at that temperature. (A
    command's ``--temperature`` does not: ``--do-sample`` does.) Sets ``settings["do_sample"]``;
    returns what is wrong with a temperature of 0 with ``"do_sample": true``."""
    temperature = obj.get("temperature")
    if temperature is None or "do_sample" in settings:
        if _is_zero(temperature) and settings.get("do_sample"):
            return "'temperature' 0 is greedy decoding: it cannot go with 'do_sample': true"
        return None
    if _is_zero(temperature):
        settings["do_sample"] = False
    elif "temperature" in settings:
        settings["do_sample"] = True
    return None


def _value(dest: str, value: Any) -> Any:
    """The setting ``dest`` of a request's JSON ``value``, checked as the option's text would
    be; ValueError says what is wrong."""
    if dest == "do_sample":
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {jsonl.json_type(value)}")
        return value
    if dest == "stop":  # OpenAI's: one text or an array of them ([]: none for this request)
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list):
            raise ValueError(f"must be a string or an array of strings, got {jsonl.json_type(value)}")
        other = next((t for t in texts if not isinstance(t, str)), "")
        if not isinstance(other, str):
            raise ValueError(f"must be a string or an array of strings, got an array holding "
                             f"{jsonl.json_type(other)}")
        return tuple(_parsed("stop", t) for t in texts)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {jsonl.json_type(value)}")
    return _parsed(dest, str(value))


def _parsed(dest: str, text: str) -> Any:
    try:
        return DECODING_TYPES[dest](text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How one request is decoded: each value the request's field, else the command's option
    (given or its default); ``special``: the completion's text keeps its special tokens (a
    request whose answer a tool-call parser reads, :mod:`prefix_attn.tool_calls`)."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    num_beams: int
    stop: Tuple[str, ...]
    special: bool = False

    @classmethod
    def of(cls, args: argparse.Namespace, fields: Optional[Dict[str, Any]] = None) -> "Decoding":
        """The command's options ``args``, overridden by a request's ``fields`` (parse_fields')."""
        values = {f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(cls)}
        values["stop"] = tuple(values["stop"])
        values.update(fields or {})
        return cls(**values)

    def generate_kwargs(self) -> dict:
        """model.generate's keywords for how tokens are picked: every one set, given whether or
        not it differs from transformers' default (the model's own were dropped)."""
        kwargs = dict(do_sample=self.do_sample, num_beams=self.num_beams,
                      repetition_penalty=self.repetition_penalty)
        if self.do_sample:  # greedy and beam search would warn of unused sampling settings
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                          min_p=self.min_p or None)
        return kwargs

    @property
    def key(self) -> tuple:
        """Equal for requests that decode alike (sampling values left out of greedy ones): they
        can share a ``model.generate`` call."""
        return (self.max_new_tokens, self.stop, self.special, tuple(sorted(self.generate_kwargs().items())))


def unused_sampling_fields(fields: Dict[str, Any], args: argparse.Namespace) -> List[str]:
    """The sampling fields a request gives that it does not use: it decodes greedily (or by beam
    search), by its own ``do_sample`` or the command's ``--do-sample``."""
    if fields.get("do_sample", args.do_sample):
        return []
    return [name for name in SAMPLING if name in fields]
