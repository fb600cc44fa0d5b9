"""prefix-attn generate: answer a JSONL file of requests, each with its own prefix, in batches.

Input: one JSON object per line, UTF-8 (a byte-order mark is accepted; blank lines skipped):

    {"id": "r1", "prefix": "support", "prompt": "How do I ...?"}
    {"prompt": "no prefix for this one"}

  "prompt"  the text to continue (required). "" after a --prompt-prefix continues the
            prefix's own text (not after a prompt entry from --bank, which keeps no ids);
            a prompt of no tokens at all (no start token) is refused
  "prefix"  a prefix name; missing, null or "" = no prefix (a --bank's default_prefix
            is not applied)
  "id"      any JSON value, unique in the file; default: the request's line number
            (1-based, blank lines counted)
  "messages" with --chat, instead of "prompt": [{"role": "user", "content": "..."}, ...]
            (roles system, user, assistant, tool, and OpenAI's developer = system; a system
            message only first; the last a user or tool message, or an assistant one to continue
            (below); content a string or OpenAI's
            text parts, joined with newlines; an assistant tool call: "content" null,
            "tool_calls": [...], whose "arguments" (an object or OpenAI's JSON text of one) go
            to the template in the form it writes: the object where it writes one with tojson);
            echoed in the result in place of "prompt"
  "tools"   with --chat: function schemas given to the chat template (tools=), an array of
            objects [{"type": "function", "function": {...}}, ...]; echoed in the result
  "continue_final_message"  with --chat, true or false (default): true continues the last
            message, an assistant's holding the start of the answer (a "prefill", e.g.
            {"role": "assistant", "content": "Sure: {"}): the rendering ends inside it, as
            apply_chat_template(..., continue_final_message=True)'s; "completion" is only the
            text generated after it, stop texts are looked for in that text only
  "add_generation_prompt"  with --chat, true (default) or false (the rendering without the
            generation prompt); false with "continue_final_message": true, as vLLM wants it
            (left out: false there too); both true is an error. Both are request fields only,
            as vLLM's: they say what the conversation is, not how it is decoded (no option)
  decoding fields, each overriding the command's option of the same name for this request
            only (null or missing: the option's value), checked as the option is (every bad
            line named in one error, before the model loads):
            "max_new_tokens" (or OpenAI's "max_tokens" or "max_completion_tokens": the same
            number; one of them), "stop" (a text or an array of texts, as OpenAI's; [] = none),
            "do_sample" (true or false), "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "num_beams"; e.g.
            {"prompt": "...", "max_tokens": 64, "stop": ["###"], "temperature": 0.7}
            A "temperature" without "do_sample" decides as OpenAI's does: 0 is greedy decoding,
            above 0 sampling at it (the command's --temperature does not: --do-sample does).
            They are copied to the result too. "seed" is not applied per request (one --seed
            draws for every batch in turn: a request's own seed could not hold in a batch it
            shares), and gets a warning
  "response_format", and with --chat and "tools" a "tool_choice" forcing a call: structured
            output as `prefix-attn serve` gives it (its --help; the optional xgrammar package):
            "completion" JSON of the schema; a forced call's "tool_calls", "completion" null;
            not with beams; checked before the model loads. Copied to the result
  any other field is copied to the result line

Output: one line per request, in input order:

    {"id": "r1", "prefix": "support", "prompt": "How do I ...?", "completion": "...", "num_tokens": 17, "finish_reason": "stop"}

A completion ends at any of the model's stop ids (its generation_config's eos_token_id and
the tokenizer's end of sequence), at the first --stop text it holds (left out of "completion";
that row generates no further; a beam reaching one is a finished hypothesis, so beam and sampled
answers may differ from the ones without --stop cut at the text) or after --max-new-tokens (each
request's "stop" and "max_new_tokens" in place of the options where it gives them).
"finish_reason" says which: "stop" (a stop id or a stop text) or "length" (max_new_tokens
reached). "num_tokens" counts the tokens generated for the completion: not the stop id, but with
a stop text, every token up to the one that completed it (whose text "completion" leaves out).

Decoding: greedy, or --do-sample (--temperature 1.0, --top-p 1.0, --top-k 0 = all tokens,
--min-p 0 = off, by default; given without --do-sample they are not used, with a warning),
--num-beams, --repetition-penalty (1.0 = off) with either: each value is the request's field, else
the option's, given or its default, and nothing else (a request's sampling fields without sampling
are named in a warning, as the options are when no request samples). A model folder's
generation_config.json is read for its eos_token_id (and bos/pad ids, cache settings) only: its do_sample, temperature, top_k, top_p,
repetition_penalty, no_repeat_ngram_size, ... are not applied, with a note on stderr naming
them (transformers' model.generate would apply them, and its top_k=50 when sampling).

The model is a local folder (--model, with its tokenizer files or prefix-attn's
byte_tokenizer.json) or the built-in tiny
default (prefix_attn.tiny.default_model: random weights, for smoke tests). An adapter made by
`prefix-attn train` belongs with the model it was trained on (OUT/base_model): a warning
says so when --model is missing or is another folder.

Prefixes come from a saved bank (--bank DIR), PEFT prefix-tuning adapters (--adapter
NAME=DIR) and shared prompts (--prompt-prefix NAME=TEXT: the KV of TEXT computed once); a
name may come from one source only. Requests using a prompt prefix (from --prompt-prefix or
a saved bank's add_prompt entries) are tokenised without the special start token, which the
prompt already carries. A batch mixes prefixes freely: model.generate(..., prefixes=[...])
reads each row's prefix from the bank.

--chat renders requests with the tokenizer's chat template (generation prompt added): a
--prompt-prefix is a system message, its entry the KV of [system] alone, and a request using it
runs the rest of [system, user(prompt)]; a template that renders the system message otherwise
once a user turn follows is refused (the prefix's KV would not be the conversation's). A request
with an adapter or no prefix runs [user(prompt)], with the template's default system prompt.
A request continuing its last (assistant) message ("continue_final_message") is refused, naming
its line, where the template does not write that message as given at the end of the rendering
(it strips or rewrites it), or writes the conversation before it otherwise than it opens a new
answer (DeepSeek-R1's generation prompt opens a <think> block an assistant message has not).

--tool-call-parser NAME (with --chat: hermes, llama3_json or mistral, as vLLM's) parses the tool
calls in the answer of a request giving "tools" (its "tool_choice", if any, not "none"): its result
gets "tool_calls", OpenAI's [{"id": "call_...", "type": "function", "function": {"name",
"arguments": JSON text}}], "completion" the text before them (null if none) and "finish_reason":
"tool_calls"; such an answer is decoded with its special tokens kept (the calls' markers may be
special tokens). An answer whose calls do not all parse (malformed, cut, naming a function not in
"tools") stays the completion (prefix_attn.tool_calls). Without the option, calls are text.

Requests decoded alike (equal decoding settings; sampling values do not count for greedy ones)
share model.generate calls: each such group runs in batches of similar prompt length, the batches
of every group longest first (little padding; the results are still written in input order).
--seed seeds torch once before the first batch: the same request file, --batch-size and options
(device, dtype and versions too) give the same answers again, as long as no batch is split for
memory; sampled answers change with anything that changes the batches (another batch size, a
request added or its fields changed), greedy and beam ones do not. A batch that runs out of
device memory is retried in halves, halved again as needed; only a single request that still does stops the run (an
error naming its line, exit status 1). After a split, the size of the first part that then ran is
the most any later batch tries for the rest of the run (a larger batch is cut into parts of it
before trying; another split lowers it, nothing raises it): one failed try, not one a batch.

Everything that can be checked is checked before any generation: the request file, prefix
names, the output path, the device, $PREFIX_ATTN_BACKEND and each request's decoding fields and
its length (prompt + prefix + its max_new_tokens within the model's positions). What needs only the
tokenizer and the model's config.json (the --chat rendering, the tokens, the lengths, each
--prompt-prefix) is checked before the weights load, and so is each --adapter and --bank against
the config's layers, kv heads and head dim (the adapter's config and tensor header, the bank
file's header). The output file is written whole or
not at all; Ctrl-C or SIGTERM stops at once and keeps the answers finished so far in
OUTPUT.partial, in input order (exit status 130 / 143), as does an error in a later batch.
With -o -, each answer is written once it and every earlier one are finished; a reader
closing standard output early stops the command quietly (exit status 141).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from . import atomic, chat as chat_template, cli_args, cli_parsers, serve_batching, serve_options, tiny, tool_calls
from .backends import check_env_backend
from .train_state import Interrupted, StopSignals
from .serve_inputs import (Request, RequestError, Source, check_prefix_names, prefix_sources,
                           read_requests, refusal, warn, warn_about_adapter_bases,
                           warn_about_option_fields, warn_about_sampling_options)

__all__ = ["main", "add_parser", "Request", "read_requests", "RequestError"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- command line ----------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to an ``argparse`` subparsers object."""
    return cli_parsers.add_parser(subparsers, "generate", run)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    cli_parsers.generate_arguments(p)


def _check_device(name: str) -> torch.device:
    device, problem = cli_args.device_problem(name)
    if problem is not None:
        raise RequestError(problem)
    return device


# -- model, bank and tokens ------------------------------------------------------------------

def _load_model(model_dir: Optional[str], device: torch.device, dtype: torch.dtype, command: str = "generate",
                tokenizer=None):
    """The model of ``model_dir`` (None: the built-in one) on ``device`` and its tokenizer
    (``tokenizer``, when :func:`prepare` loaded it already)."""
    from prefix_attn import hf

    hf.register()
    if model_dir is None:
        model = tiny.default_model().to(dtype)
    else:
        try:
            model = tiny.load_model_folder(model_dir, dtype=dtype)
        except tiny.ModelFolderError as exc:
            raise RequestError(str(exc)) from None
    model = model.to(device).eval()
    if hf.attn_implementation(model) != hf.ATTN_NAME:
        model.set_attn_implementation(hf.ATTN_NAME)
    dropped = _drop_model_decoding(model)
    if dropped:
        settings = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(dropped.items()))
        print(f"prefix-attn {command}: note: {model_dir}'s generation_config.json sets {settings}: not "
              f"applied ({command}'s options, at their defaults unless given, decide how tokens are "
              "picked)", file=sys.stderr)
    return model, tokenizer if tokenizer is not None else tiny.load_tokenizer(model_dir)


# the fields of a model's generation config that generate keeps: its token ids (eos_token_id
# gives the stop ids) and cache settings, none of which decides which token comes next
_KEPT_GENERATION_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                           "use_cache", "cache_implementation")


def _drop_model_decoding(model) -> Dict[str, object]:
    """Replace ``model.generation_config`` by transformers' defaults with only its kept fields:
    model.generate fills what a call does not set from it, so a folder's
    ``generation_config.json`` (temperature, top_k, repetition_penalty, no_repeat_ngram_size, ...)
    would otherwise change the answers unseen. Returns the values dropped that differ from
    transformers' defaults."""
    from transformers import GenerationConfig

    old = model.generation_config
    # transformers' defaults for what a call and the model leave unset (a private helper of
    # transformers 5; an older one's defaults are its GenerationConfig()'s)
    defaults_of = getattr(GenerationConfig, "_get_default_generation_params", None)
    defaults = defaults_of() if defaults_of is not None else GenerationConfig().to_dict()
    dropped = {k: v for k, v in old.to_diff_dict().items()
               if k not in _KEPT_GENERATION_FIELDS and k != "transformers_version" and not k.startswith("_")
               and v is not None and v != defaults.get(k, False)}  # output_attentions=False, ...
    kept = {k: getattr(old, k) for k in _KEPT_GENERATION_FIELDS if getattr(old, k, None) is not None}
    model.generation_config = GenerationConfig(**kept)
    return dropped


def _build_bank(model, sources: List[Source], bank_dir: Optional[str], prompt_ids: Dict[str, List[int]]):
    """The model's bank with every source loaded, each ``--prompt-prefix`` from its ids
    (``prompt_ids``, :func:`_prompt_prefix_ids`)."""
    from prefix_attn.bank import PrefixBank

    bank = PrefixBank.load(bank_dir, model) if bank_dir else PrefixBank.attach(model)
    for s in sources:
        if s.option == "--adapter":
            bank.load_peft(s.name, s.value)
        elif s.option == "--prompt-prefix":
            bank.add_prompt(s.name, torch.tensor(prompt_ids[s.name]))
    return bank


def _prompt_prefix_ids(sources: List[Source], tokenizer, chat, vocab_size: Optional[int]) -> Dict[str, List[int]]:
    """The token ids of each ``--prompt-prefix`` (a saved bank keeps only the KV of its
    prompts); with ``chat`` (a :class:`~prefix_attn.chat.ChatTemplate`), those of the prompt as
    a system message. Each has tokens, all in the model's ``vocab_size`` (None: unknown)."""
    prompt_ids: Dict[str, List[int]] = {}
    for s in sources:
        if s.option != "--prompt-prefix":
            continue
        ids = chat.system_ids(s.name, s.value) if chat else tiny.encode(tokenizer, s.value, special=True)
        if not ids:
            raise RequestError(f"--prompt-prefix {s.name}: {s.value!r} has no tokens")
        problem = tiny.vocab_problem(tokenizer, ids, vocab_size) if vocab_size is not None else None
        if problem is not None:
            raise RequestError(f"--prompt-prefix {s.name}: {problem}")
        prompt_ids[s.name] = ids
    return prompt_ids


@dataclass
class _Job:
    """What runs for one request: ``ids`` after bank entry ``prefix`` (None: no prefix)."""

    request: Request
    prefix: Optional[str]
    ids: List[int]


def _plan(requests: List[Request], tokenizer, bank, prompt_ids: Dict[str, List[int]], path: str,
          chat=None, heads: Optional[Dict[str, Optional[str]]] = None, vocab_size: Optional[int] = None,
          add_head=None) -> List[_Job]:
    """Tokenise every request. No request runs on zero tokens (the first new token would be
    predicted from a pad): an empty prompt after a ``--prompt-prefix`` continues the prompt's
    text, exactly: it runs as the prompt's last token after an entry holding the KV of the
    other tokens (the first P-1 positions of the prompt's KV). Anything else with no tokens
    is refused, all such lines in one error. With ``chat``, the ids come from its template; a
    request's own token ids (``Request.ids``) are taken as they are, after its prefix as a text
    prompt's tokens are (which after a prompt prefix are tokenised without the start token).
    ``heads``: the entries made for such prompts so far (prompt prefix -> its head entry), kept
    across calls by a caller planning request after request (each prompt's head is made once).
    ``bank``: a PrefixBank, or before the weights load :class:`_Prefixes` (its ``kind`` and
    ``entry_len``); ``vocab_size``: the model's (default: the bank's model's embeddings);
    ``add_head(bank, name, length)`` makes a head entry (default :func:`_add_prompt_head`)."""
    chat_ids = chat.request_ids(requests, bank, path) if chat else None
    jobs, bad, unknown = [], [], []
    heads = {} if heads is None else heads
    if vocab_size is None:
        vocab_size = bank.model.get_input_embeddings().num_embeddings
    add_head = _add_prompt_head if add_head is None else add_head
    for r in requests:
        after_prompt = _after_prompt(r, bank)
        ids = (list(r.ids) if r.ids is not None else chat_ids[r.line] if chat else
               tiny.encode(tokenizer, r.prompt, special=not after_prompt))
        problem = tiny.vocab_problem(tokenizer, ids, vocab_size)
        if problem is not None:
            unknown.append(f"{path}:{r.line}: {problem}")
        elif ids:
            jobs.append(_Job(r, r.prefix, ids))
        elif after_prompt and r.prefix in prompt_ids:
            if r.prefix not in heads:
                heads[r.prefix] = add_head(bank, r.prefix, len(prompt_ids[r.prefix]))
            jobs.append(_Job(r, heads[r.prefix], prompt_ids[r.prefix][-1:]))
        elif after_prompt:
            bad.append(f"{path}:{r.line}: empty prompt after prompt prefix {r.prefix!r} from --bank, which "
                       "keeps no token ids to continue from; give it as --prompt-prefix or add text")
        else:
            bad.append(f"{path}:{r.line}: the prompt has no tokens ({r.prompt!r}; this tokenizer adds "
                       "no start token) and nothing to continue from")
    if unknown:
        raise refusal(f"{len(unknown)} request(s) with tokens the model does not have:", unknown)
    if bad:
        raise refusal(f"{len(bad)} request(s) with nothing to generate from:", bad)
    return jobs


def _after_prompt(r: Request, bank) -> bool:
    """Whether ``r`` runs after a prompt prefix (its text then has no start token: the prompt's)."""
    return r.prefix is not None and bank.kind(r.prefix) == "prompt"


def _add_prompt_head(bank, name: str, length: int) -> Optional[str]:
    """A bank entry with the KV of all but the last token of prompt entry ``name`` (None for a
    one-token prompt: nothing before it); returns its name, internal and never a user's."""
    if length == 1:
        return None
    head = f"{name}\x00head"
    while head in bank:
        head += "\x00"
    keys, values = bank.get(name)
    bank.add(head, keys[:, :, :-1], values[:, :, :-1])
    return head


def _check_lengths(jobs: List[_Job], config, bank, decoding: List[serve_options.Decoding], path: str) -> None:
    """Each request's prefix + prompt + its own ``max_new_tokens`` (``decoding[i]`` is
    ``jobs[i]``'s) fits the model's positions (``config``'s; the tokens after a prefix of P are
    numbered from P). A prefix whose length ``bank.entry_len`` does not know (None, before the
    weights load) is left to the check after."""
    limit = cli_args.max_positions(config)
    if limit is None:
        return
    bad = []
    for job, settings in zip(jobs, decoding):
        max_new_tokens = settings.max_new_tokens
        P = bank.entry_len(job.prefix) if job.prefix is not None else 0
        if P is None:
            continue
        total = P + len(job.ids) + max_new_tokens
        if total > limit:
            shown = job.request.prefix if job.request.prefix is not None else "none"
            bad.append(f"{path}:{job.request.line}: {len(job.ids)} prompt tokens + {P} prefix tokens "
                       f"(prefix {shown}) + {max_new_tokens} new tokens = {total}")
    if bad:
        raise refusal(f"{len(bad)} request(s) longer than the model's {limit} positions "
                       "(shorten the prompt or lower --max-new-tokens, or the request's \"max_new_tokens\"):", bad)


def _progress(total: int, enabled: bool):
    from .progress import progress_bar
    return progress_bar(total, "generate", "req", enabled=enabled)


# -- output ----------------------------------------------------------------------------------


class OutOfMemory(Exception):
    """A request ran out of device memory even alone (its batch halved down to it)."""


class OutputClosed(Exception):
    """Standard output was closed by its reader after ``count`` results."""

    def __init__(self, count: int):
        super().__init__(count)
        self.count = count


class _Output:
    """Result lines go to a temporary file next to ``path``, moved into place by ``commit``;
    ``close`` (always call it) removes the temporary file and any folder made for it if the
    output was not committed. Opening checks the path, so it happens before the model loads.
    Results come by request (``put``) in any order and are written in file order: one that
    finishes before an earlier request is held until that one is written."""

    def __init__(self, path: str):
        self.path, self.tmp, self.f, self._file, self._made = path, None, None, None, []
        self.count = 0  # result lines written
        self._held: Dict[int, dict] = {}  # finished results waiting for an earlier request's
        if path == "-":
            self.f = sys.stdout
            return
        if not path:
            raise RequestError("output '' is empty: give a file name (or - for standard output)")
        if os.path.isdir(path):
            raise RequestError(f"output {path!r} is a folder; give a file name")
        if path.endswith(tuple(sep for sep in (os.sep, os.altsep) if sep)) \
                or os.path.basename(path) in (".", ".."):  # a folder's name
            raise RequestError(f"output {path!r} names a folder (a path separator, . or .. at "
                               f"its end): give a file name")
        try:
            self._made = atomic.make_folders(os.path.dirname(os.path.abspath(path)))
            self._file = atomic.Replacement(path, suffix=".jsonl")
            self.tmp = self._file.tmp
            self.f = open(self.tmp, "w", encoding="utf-8")
        except OSError as exc:
            self.close()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> RequestError:
        return RequestError(f"cannot write output {self.path!r}: {exc.strerror or exc}")

    @property
    def finished(self) -> int:
        """Results finished: written or held."""
        return self.count + len(self._waiting())

    def _waiting(self) -> List[int]:
        """The indices held and not written yet, in order. Until save_partial the lines written
        are requests 0 .. count - 1 (no gap), so a result is written once ``count`` is past its
        index, whether or not it is still in ``_held``: a signal (Interrupted is raised wherever
        the main thread is) landing between a result's write and its removal from ``_held``
        neither writes it twice nor counts it twice."""
        return sorted(i for i in self._held if i >= self.count)

    def put(self, index: int, obj: dict) -> None:
        """The result of request ``index`` (0-based, in file order; each index once): written
        now if every earlier request's is, else held until they are."""
        self._held[index] = obj
        while self.count in self._held:  # count: the next index (no gap before save_partial)
            self.write(self._held[self.count])  # count moves past it: written
        for written in [i for i in self._held if i < self.count]:
            del self._held[written]

    def write(self, obj: dict) -> None:
        try:
            self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            if self.tmp is None:  # standard output: each result as it comes, for pipelines
                self.f.flush()
        except BrokenPipeError:
            if self.tmp is None:  # standard output closed by its reader (`| head`): a stop
                raise OutputClosed(self.count) from None
            raise
        except OSError as exc:
            raise self._error(exc) from None
        self.count += 1

    def save_partial(self, total: int) -> str:
        """After an interruption: the finished results go to ``PATH.partial`` (never to the
        output itself, which a pipeline would take for complete), in file order, those held
        for an unfinished earlier request included; returns what was kept."""
        waiting = self._waiting()
        done = f"{self.count + len(waiting)} of {total} requests were finished"
        try:
            for index in waiting:
                self.write(self._held.pop(index))
        except OutputClosed:  # standard output's reader is gone
            cli_args.silence_stdout()
            return f"{done}; standard output was closed"
        except RequestError as exc:  # the temporary file, removed by close
            return f"{done}; saving them failed: {exc}"
        if self.tmp is None:
            try:
                self.f.flush()
            except BrokenPipeError:  # its reader is gone too
                cli_args.silence_stdout()
                return f"{done}; standard output was closed"
            return f"{done}; their results were written to standard output"
        if self.count == 0:
            return f"{done}; nothing was written"
        partial = self.path + ".partial"
        try:
            self.f.close()
            os.replace(self.tmp, partial)
        except OSError as exc:
            return f"{done}; saving them to {partial!r} failed: {exc.strerror or exc}"
        self._made = []
        return (f"{done}; their results are in {partial!r} ({self.path!r} was not written: "
                "run again for all of them)")

    def commit(self) -> None:
        try:
            if self.tmp is None:
                self.f.flush()
                return
            self.f.close()
            self._file.commit()
        except BrokenPipeError:
            if self.tmp is None:
                raise OutputClosed(self.count) from None
            raise self._error(BrokenPipeError()) from None
        except OSError as exc:
            raise self._error(exc) from None
        self._made = []

    def close(self) -> None:
        if self.path == "-":
            return
        if self.f is not None and not self.f.closed:
            self.f.close()
        if self._file is not None:
            self._file.abort()
        atomic.remove_folders(self._made)


# -- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Run ``generate`` from parsed arguments; returns the exit code (2 on a user error)."""
    try:
        with cli_args.transformers_progress(enabled=not args.no_progress), StopSignals() as signals:
            return _run(args, signals)
    except (RequestError, KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"prefix-attn generate: error: {msg}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"prefix-attn generate: stopped: {signal.Signals(stop.signum).name}: {stop.note}",
              file=sys.stderr)
        return 128 + stop.signum
    except OutOfMemory as exc:  # after the finished answers were kept (_run)
        print(f"prefix-attn generate: error: {exc}", file=sys.stderr)
        return 1
    except OutputClosed as closed:
        cli_args.silence_stdout()
        print(f"prefix-attn generate: stopped: standard output was closed after {closed.count} "
              f"result{'' if closed.count == 1 else 's'}", file=sys.stderr)
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace, signals: StopSignals) -> int:
    device = _check_device(args.device)
    check_env_backend(device.type, "generation")
    sources = prefix_sources(args)
    requests = read_requests(args.input)
    if "-" not in (args.input, args.output) and os.path.exists(args.output) \
            and os.path.samefile(args.input, args.output):
        raise RequestError(f"output {args.output!r} is the request file: its requests would be "
                           "replaced by the answers; give another -o")
    check_prefix_names(requests, [s.name for s in sources], args.input)
    chat_template.check_requests(requests, args.chat, args.input)
    problem = (chat_template.options_need_chat(args.chat_option, args.chat)
               or tool_calls.need_chat(args.tool_call_parser, args.chat))
    if problem is not None:
        raise RequestError(problem)
    if args.chat and requests:
        chat_template.check_template(args.model)
    warn_about_option_fields(requests)
    warn_about_sampling_options(args, requests, args.input)
    out = _Output(args.output)
    try:
        if not requests:
            print(f"prefix-attn generate: no requests in {args.input}", file=sys.stderr)
        else:
            warn_about_adapter_bases(sources, args.model)
            try:
                _generate(args, device, sources, requests, out, signals)
                signals.raise_if_received()  # a stop whose own raise was lost: not a complete run
            except Interrupted as stop:
                stop.note = out.save_partial(len(requests))
                raise
            except OutputClosed:  # a stop, said once by main
                raise
            except Exception:  # a batch failed (out of memory, ...): the finished ones are kept
                if out.finished:
                    print(f"prefix-attn generate: {out.save_partial(len(requests))}", file=sys.stderr)
                raise
        out.commit()
    finally:
        out.close()
    return 0


@dataclass
class Served:
    """What answers requests, loaded once: the model, its tokenizer, the bank of every prefix
    source, the ids of each ``--prompt-prefix`` (``prompt_ids``), the chat template (None
    without ``--chat``), the stop ids, the pad id and the ``--tool-call-parser`` (None: none).
    ``prefix-attn generate`` answers a file
    with it, ``prefix-attn serve`` (:mod:`prefix_attn.serve_http`) request after request."""

    model: object
    tokenizer: object
    bank: object
    prompt_ids: Dict[str, List[int]]
    chat: object
    device: torch.device
    stop: List[int]
    pad_id: Optional[int]
    heads: Dict[str, Optional[str]] = field(default_factory=dict)  # _plan's, kept across calls
    tool_parser: Optional[str] = None
    grammars: object = None  # structured_logits.Grammars, made when a request first asks for one

    def settings(self, args: argparse.Namespace, request: Request) -> serve_options.Decoding:
        """How ``request`` decodes: the options ``args`` and its fields; its text with special
        tokens where a tool-call parser reads it. RequestError: beams with structured output."""
        special = tool_calls.applies(self.tool_parser, request) is not None
        settings = serve_options.Decoding.of(args, {**request.options, "special": special})
        check_beams([request], [settings], "request")
        return settings

    def tool_calls(self, request: Request, text: str) -> Optional[tool_calls.Parsed]:
        """The tool calls of ``request``'s answer ``text`` (None: none, or no parser applies); a
        forced call's (:func:`prefix_attn.structured.tool_calls`: finish_reason "stop" for a named
        function, as vLLM's, "tool_calls" for "required")."""
        if request.constraint is not None and request.constraint.tool:
            from . import structured

            calls = structured.tool_calls(request.constraint, text)
            reason = "stop" if request.constraint.kind == "function" else "tool_calls"
            return None if calls is None else tool_calls.Parsed(None, calls, reason)
        return tool_calls.parse(tool_calls.applies(self.tool_parser, request), text, request.tools)

    def holder(self, request: Request):
        """For a streamed answer: each stable piece of text to what goes out now
        (:func:`prefix_attn.tool_calls.holder`); a forced call's text all held for the end."""
        if request.constraint is not None and request.constraint.tool:
            return lambda piece: ""
        return tool_calls.holder(tool_calls.applies(self.tool_parser, request))

    def _grammars(self):
        if self.grammars is None:
            from .structured_logits import Grammars

            self.grammars = Grammars(self.tokenizer, self.model.get_output_embeddings().weight.shape[0], self.stop)
        return self.grammars

    def plan(self, requests: List[Request], path: str) -> List[_Job]:
        """The jobs of ``requests`` (:func:`_plan`; ``path`` names them in errors)."""
        return _plan(requests, self.tokenizer, self.bank, self.prompt_ids, path, self.chat, self.heads)

    def request_ids(self, request: Request, path: str, special: bool = True) -> List[int]:
        """The token ids of ``request``'s prompt as :meth:`plan` runs them after its prefix, with
        no bank entry made: a conversation's from the chat template, a text's with the start token
        unless after a prompt prefix (which carries it) or ``special`` is False; an empty prompt
        after a prompt prefix has none of its own (it continues the prefix's). Raises
        RequestError where the chat template refuses the conversation, as plan does."""
        if self.chat is not None:
            return self.chat.request_ids([request], self.bank, path)[request.line]
        after_prompt = _after_prompt(request, self.bank)
        return tiny.encode(self.tokenizer, request.prompt, special=special and not after_prompt)

    def check_lengths(self, jobs: List[_Job], decoding: List[serve_options.Decoding], path: str) -> None:
        _check_lengths(jobs, self.model.config, self.bank, decoding, path)

    def generate(self, jobs: List[_Job], settings: serve_options.Decoding, criteria=(),
                 streamer=None) -> List[List[int]]:
        """The new token ids of each job, decoded alike by ``settings`` in one model.generate
        call (left padded; each row ends at its first stop text too; a row whose request asks
        for structured output constrained by its grammar alone); ``criteria``: more
        stopping criteria (transformers' ``StoppingCriteria``); ``streamer``: transformers'
        streamer, given each step's tokens (not with beams)."""
        from transformers import StoppingCriteriaList

        from . import serve_stop  # imports transformers

        ids, mask = tiny.left_pad([job.ids for job in jobs], self.pad_id)
        stopping = list(criteria)
        if settings.stop:  # each row ends at its first stop text: the batch once every row has
            stopping.append(serve_stop.StopTexts(self.tokenizer, settings.stop, ids.shape[1], self.stop, self.pad_id,
                                                 settings.special))
        gen_kwargs = dict(pad_token_id=self.pad_id, eos_token_id=self.stop or None,
                          max_new_tokens=settings.max_new_tokens, **settings.generate_kwargs())
        if stopping:
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList(stopping)
        if streamer is not None:
            gen_kwargs["streamer"] = streamer
        constraints = [job.request.constraint for job in jobs]
        if any(c is not None for c in constraints):  # each row its own grammar (None: free)
            from transformers import LogitsProcessorList

            gen_kwargs["logits_processor"] = LogitsProcessorList(
                [self._grammars().processor(constraints, ids.shape[1])])
        with torch.no_grad():
            gen = self.model.generate(ids.to(self.device), attention_mask=mask.to(self.device),
                                      prefixes=[job.prefix for job in jobs], **gen_kwargs)
        return gen[:, ids.shape[1]:].tolist()

    def finish(self, new: List[int], settings: serve_options.Decoding):
        """``(completion, num_tokens, finish_reason)`` of a row's new ids
        (:func:`prefix_attn.serve_stop.finish`)."""
        from .serve_stop import finish

        return finish(self.tokenizer, new, self.stop, self.pad_id, settings.stop, settings.special)


@dataclass
class Prepared:
    """What is loaded and checked before the model's weights (:func:`prepare`): the tokenizer,
    the model's config, the chat template (None without ``--chat``), the ids of each
    ``--prompt-prefix`` and the vocabulary size (the config's; None where it names none)."""

    tokenizer: object
    config: object
    chat: object
    prompt_ids: Dict[str, List[int]]
    vocab_size: Optional[int]


def prepare(args: argparse.Namespace, sources: List[Source], command: str = "generate") -> Prepared:
    """Load ``args.model``'s config and tokenizer, not its weights, and check what depends on
    them alone: the chat template (``args.chat``) and each ``--prompt-prefix``'s tokens (its
    rendering as a system message). A large model is thus not loaded to be refused."""
    config = tiny.default_config() if args.model is None else tiny.load_model_config(args.model)
    _check_sources_fit(config, sources, args.bank)
    tokenizer = tiny.load_tokenizer(args.model)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = getattr(text_config, "vocab_size", None)
    vocab_size = vocab_size if isinstance(vocab_size, int) and vocab_size > 0 else None
    with _warnings_as(command):
        chat = (chat_template.ChatTemplate(tokenizer, args.model, options=dict(args.chat_option))
                if args.chat else None)
        prompt_ids = _prompt_prefix_ids(sources, tokenizer, chat, vocab_size)
    return Prepared(tokenizer, config, chat, prompt_ids, vocab_size)


def _check_sources_fit(config, sources: List[Source], bank_dir: Optional[str]) -> None:
    """Each ``--adapter`` (its config and tensor header) and the ``--bank`` file's header checked
    against the dims of a model of ``config``, with the errors loading them into its bank gives:
    a mismatch is said before the weights load, not after. A config whose dims cannot be read
    leaves the checks to the bank."""
    from prefix_attn import bank_file, model_info, peft_format

    try:
        dims = model_info.config_dims(config)
    except ValueError:
        return
    with warnings.catch_warnings():  # said once, by the load itself
        warnings.simplefilter("ignore")
        for s in sources:
            if s.option == "--adapter":
                peft_format.check_peft_adapter(s.value, peft_format.BankShape(*dims),
                                               peft_format.query_heads_of(config))
    if bank_dir:
        saved = bank_file.read(bank_dir, tensors=False)
        if saved.dims != dims:
            raise ValueError(f"{bank_file.path_in(bank_dir)}: saved for (L, Hkv, D)={saved.dims}, "
                             f"but the model has {dims}")


def load(args: argparse.Namespace, device: torch.device, sources: List[Source], command: str = "generate",
         prepared: Optional[Prepared] = None) -> Served:
    """The model of ``args.model`` on ``device`` in ``args.dtype``, its bank of ``sources``
    (``--bank``, ``--adapter``, ``--prompt-prefix``) and, with ``args.chat``, its chat template;
    the bank's warnings said as ``command``'s own. ``prepared``: :func:`prepare`'s (default: it
    runs first, so what the tokenizer alone refuses is said before the weights load)."""
    prepared = prepare(args, sources, command) if prepared is None else prepared
    model, tokenizer = _load_model(args.model, device, _DTYPES[args.dtype], command=command,
                                   tokenizer=prepared.tokenizer)
    with _warnings_as(command):
        bank = _build_bank(model, sources, args.bank, prepared.prompt_ids)
    stop = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop or [None])[0]
    return Served(model, tokenizer, bank, prepared.prompt_ids, prepared.chat, device, stop, pad_id,
                  tool_parser=getattr(args, "tool_call_parser", None))


@contextlib.contextmanager
def _warnings_as(command: str):
    """The package's warnings raised inside (the bank's, the chat template's) said as
    ``command``'s own; others shown as they came."""
    package = os.path.dirname(os.path.abspath(__file__))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        yield
    for w in caught:
        if not os.path.abspath(w.filename).startswith(package):  # not the bank's: as it came
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        hint = (" (here: give them as --prompt-prefix NAME=TEXT)"
                if "recompute them here with add_prompt" in str(w.message) else "")
        warn(f"{w.message}{hint}", command)


class _Prefixes:
    """What is known of each prefix before the model's weights load: its kind and length
    (a ``--bank`` entry's from the file's header, an adapter's ``num_virtual_tokens``, a
    ``--prompt-prefix``'s tokens); a PrefixBank's ``kind`` and ``entry_len`` for :func:`_plan`
    and :func:`_check_lengths`. A length not known is None."""

    def __init__(self, sources: List[Source], bank_dir: Optional[str], prompt_ids: Dict[str, List[int]]):
        from . import bank_file
        from .serve_inputs import adapter_length

        saved = bank_file.read(bank_dir, tensors=False) if bank_dir else None
        self._kinds = dict(zip(saved.names, saved.kinds)) if saved else {}
        self._lengths: Dict[str, Optional[int]] = bank_file.entry_lengths(bank_dir) if bank_dir else {}
        for s in sources:
            if s.option == "--adapter":
                self._kinds[s.name], self._lengths[s.name] = "fixed", adapter_length(s.value)
            elif s.option == "--prompt-prefix":
                self._kinds[s.name], self._lengths[s.name] = "prompt", len(prompt_ids[s.name])

    def kind(self, name: str) -> str:
        return self._kinds[name]

    def entry_len(self, name: str) -> Optional[int]:
        return self._lengths.get(name)

    def add_head(self, _, name: str, length: int) -> Optional[str]:
        """:func:`_add_prompt_head`'s entry, its length only."""
        if length == 1:
            return None
        self._lengths[f"{name}\x00head"] = length - 1
        return f"{name}\x00head"


def _check_before_loading(args: argparse.Namespace, sources: List[Source], requests: List[Request],
                          prepared: Prepared) -> None:
    """Every check of the requests that needs the tokenizer and the config only, made before
    the weights load, with the messages the same checks give after: each request's tokens
    (its chat rendering, tokens the model has, something to generate from) and its length."""
    prefixes = _Prefixes(sources, args.bank, prepared.prompt_ids)
    jobs = _plan(requests, prepared.tokenizer, prefixes, prepared.prompt_ids, args.input, prepared.chat,
                 vocab_size=prepared.vocab_size or 2 ** 62,  # unknown: judged once the weights load
                 add_head=prefixes.add_head)
    decoding = [serve_options.Decoding.of(args, job.request.options) for job in jobs]
    check_beams([job.request for job in jobs], decoding, args.input)
    _check_lengths(jobs, prepared.config, prefixes, decoding, args.input)


def check_beams(requests: List[Request], decoding: List[serve_options.Decoding], path: str) -> None:
    """No request asking for structured output decodes by beam search (one grammar a row: not
    served); RequestError naming each such line."""
    bad = [f"{path}:{r.line}" for r, d in zip(requests, decoding) if r.constraint is not None and d.num_beams > 1]
    if bad:
        error = RequestError(f"{', '.join(bad)}: structured output ('response_format' or a 'tool_choice' forcing "
                             "a call) is not served with beam search: give num_beams 1")
        error.param = "num_beams"
        raise error


def _generate(args: argparse.Namespace, device: torch.device, sources: List[Source],
              requests: List[Request], out: _Output, signals: StopSignals) -> None:
    prepared = prepare(args, sources)
    _check_before_loading(args, sources, requests, prepared)
    served = load(args, device, sources, prepared=prepared)
    jobs = served.plan(requests, args.input)
    decoding = [served.settings(args, job.request) for job in jobs]  # jobs[i]'s
    served.check_lengths(jobs, decoding, args.input)
    torch.manual_seed(args.seed)  # after loading: building the default model seeds torch itself

    running: List[int] = []  # the batch answer runs now: the request alone when it runs out of memory

    def answer(batch: List[int]) -> None:  # jobs[i] answers requests[i]: put in file order
        # a SIGINT / SIGTERM whose Interrupted was raised inside a __del__ (a garbage collection)
        # is lost there: Python prints it and goes on; the next batch sees it
        signals.raise_if_received()
        running[:] = batch
        settings = decoding[batch[0]]  # the batch's requests decode alike (serve_batching.by_setting)
        for i, new in zip(batch, served.generate([jobs[i] for i in batch], settings)):
            answer = served.finish(new, settings)
            out.put(i, _result(jobs[i].request, answer, served.tool_calls(jobs[i].request, answer[0])))
        bar.update(len(batch))

    def say(message: str) -> None:  # under the progress bar
        bar.write(f"prefix-attn generate: {message}", file=sys.stderr)

    bar = _progress(len(jobs), enabled=not args.no_progress)
    fitting = serve_batching.Fitting()  # the batch size that fit after running out of memory
    try:
        for batch in serve_batching.by_setting([len(j.ids) for j in jobs], [d.key for d in decoding],
                                               args.batch_size):
            serve_batching.in_halves_on_oom(answer, batch, device, say, fitting)
    except serve_batching.OutOfMemoryError as exc:  # only a request alone raises it
        raise OutOfMemory(_out_of_memory(jobs[running[0]], decoding[running[0]], served.bank, args, exc)) from None
    finally:
        bar.close()


def _out_of_memory(job: _Job, settings: serve_options.Decoding, bank, args: argparse.Namespace,
                   exc: BaseException) -> str:
    """What stops the run when ``job``, decoded with ``settings``, runs out of device memory
    alone: the request's line and sizes, the device's message, what to lower."""
    P = bank.entry_len(job.prefix) if job.prefix is not None else 0
    beams = f" x {settings.num_beams} beams" if settings.num_beams > 1 else ""
    lower = "--max-new-tokens or --num-beams" if settings.num_beams > 1 else "--max-new-tokens"
    dtype = ", use --dtype bfloat16" if args.dtype == "float32" else ""
    message = tiny._first_line(exc)
    return (f"{args.input}:{job.request.line}: ran out of device memory even alone ({len(job.ids)} prompt "
            f"tokens + {P} prefix tokens + {settings.max_new_tokens} new tokens{beams}): {message}; lower "
            f"{lower}, shorten the prompt{dtype} or use a device with more memory")


def _stop_ids(model, tokenizer) -> List[int]:
    """The ids that end a completion: the model's ``generation_config.eos_token_id`` (an id or a
    list: instruct models stop at several, e.g. end of turn and end of text) and the
    tokenizer's end-of-sequence id."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else list(ids) if isinstance(ids, (list, tuple)) else [ids]
    if tokenizer.eos_token_id is not None:  # a fine-tune may have changed only the tokenizer's
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(int(i) for i in ids))


def _result(r: Request, answer, parsed: Optional[tool_calls.Parsed] = None) -> dict:
    """The result line of request ``r``; ``parsed``: the tool calls its answer holds, the
    completion then the content left (null if none), finish_reason "tool_calls"."""
    completion, count, reason = answer  # Served.finish's
    result = {"id": r.id, "prefix": r.prefix,
              **({"prompt": r.prompt} if r.messages is None else {"messages": r.messages}),
              "completion": completion, "num_tokens": count, "finish_reason": reason}
    if parsed is not None:
        result.update(completion=parsed.content, tool_calls=parsed.calls, finish_reason=parsed.reason)
    result.update({k: v for k, v in r.extra.items() if k not in result})  # echo unknown fields
    return result


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``prefix-attn generate`` (``argv`` without the subcommand name)."""
    parser = argparse.ArgumentParser(prog="prefix-attn generate", description=__doc__,
                                     formatter_class=cli_args.HelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
