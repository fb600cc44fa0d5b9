"""prefix-attn serve: an OpenAI-compatible HTTP server, each request with its own prefix.

    prefix-attn serve --adapter support=out/adapter --prompt-prefix terse='Answer briefly.'
    curl -s localhost:8000/v1/completions -d '{"model": "support", "prompt": "How do I ...?", "max_tokens": 32}'

Endpoints (JSON in and out; Python's standard library only: http.server):

  POST /v1/completions       {"prompt": "..." or [...] (below), "model": NAME, "max_tokens": 32, ...}
                             -> {"id", "object": "text_completion", "created", "model",
                                 "choices": [{"index": 0, "text", "finish_reason", "logprobs": null}],
                                 "usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}
                             (without --chat; with it, use the next one)
  POST /v1/chat/completions  with --chat: {"messages": [...], "tools": [...], "model": NAME, ...}
                             -> {"object": "chat.completion", "choices": [{"index": 0, "message":
                                 {"role": "assistant", "content"}, "finish_reason"}], ...}
  GET  /v1/models            the base model and every prefix, as vLLM lists LoRA adapters
  GET  /health               {"status": "ok"}
  GET  /metrics              Prometheus' text format (below)
  POST /tokenize             vLLM's: {"prompt": "...", "add_special_tokens": true, "model": NAME} (with
                             --chat: {"messages": [...], ...}) -> {"tokens", "count", "max_model_len"}
  POST /detokenize           vLLM's: {"tokens": [ids]} -> {"prompt": text}
  GET  /tokenizer_info       {"tokenizer_class", "bos_token", "eos_token", "pad_token", "unk_token",
                             "model_max_length", "chat_template" where the tokenizer has one}

The tokenizer endpoints are what lm-evaluation-harness's remote tokenizer calls (its
local-completions finds them itself), so it needs no tokenizer of its own. /tokenize's ids are
those the server runs for that prompt after the prefix its "model" names: a text's with the
tokenizer's start token where "add_special_tokens" (default true) and not after a prompt prefix
(which carries it); an empty prompt after a prompt prefix has none of its own; --chat's
conversation as the chat template renders it ("add_special_tokens" not applied); "prompt" only
without --chat, "messages" only with it, as the completions endpoints. max_model_len: the
model's positions (null where unknown), which a prefix's tokens take too. "return_token_strs": true
(vLLM's) adds "token_strs", each id's token string as the tokenizer names it
(convert_ids_to_tokens: "Ġthe", "<0xC3>"; the byte tokenizer's bytes as "<0x41>", its special ids
"<pad>", "<s>", "</s>"). /detokenize keeps special tokens'
text (vLLM's); ids outside the vocabulary are a 400 naming their place. The byte tokenizer's
special tokens have no text: null in /tokenizer_info.

A request's "model" names the prefix to use, as vLLM's names a LoRA adapter: a prefix name, or the
base model's id (the --model folder as given, or "prefix-attn-tiny") or none for no prefix; a
"prefix" field may name it instead (both: the same name). A request is what a line of `prefix-attn
generate`'s request file is, checked by the same code: "prompt" (below), or "messages",
"tools", "continue_final_message" and "add_generation_prompt" (vLLM's: continue a last assistant
message) with --chat, and the decoding fields "max_tokens" (or "max_completion_tokens",
"max_new_tokens"), "stop", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
"num_beams", "do_sample", each overriding the option of the same name for that request,
"logprobs", "top_logprobs", "echo" and "n" (below), and "stream" (below). As
generate, greedy unless do_sample (the request's, else --do-sample), or, as in OpenAI's API, a
request's "temperature" without "do_sample": 0 greedy, above 0 sampling at it. The answer is generate's for that request: the same text,
finish_reason ("stop": a stop id or a stop text; "length": max_tokens reached) and token count
("usage": prompt_tokens counts the tokens run after the prefix, completion_tokens generate's
"num_tokens"). Other fields are ignored, except those asking for what is not served, refused
with 400: "best_of" above 1, "suffix", "logit_bias", nonzero "presence_penalty" / "frequency_penalty", "seed"
where the request samples (one --seed draws for every batch in turn; decoded without sampling,
a seed changes nothing and is taken). A chat answer is the generated text as "content"; with
--tool-call-parser NAME (hermes, llama3_json, mistral: as generate's, prefix_attn.tool_calls), a
request giving "tools" (its "tool_choice" not "none") has the calls in it as "tool_calls" (OpenAI's
objects, "arguments" a JSON text, "id" random), "content" the text before them (null if none) and
finish_reason "tool_calls"; an answer whose calls do not all parse stays content. Streamed, the
text that may still be a call is held back: the calls go out when the answer ends, in one chunk of
"delta": {"tool_calls": [{"index", "id", "type", "function"}, ...]}, or the text as content.

Structured outputs, as vLLM serves them (prefix_attn.structured; the optional xgrammar package,
`pip install 'prefix_attn[structured]'`, imported only when a request asks: without it a 400
naming it): "response_format": {"type": "json_object"} or {"type": "json_schema", "json_schema":
{"name", "schema", "strict"}} constrains the answer by a grammar (JSON with ", " and ": " as separators, no other whitespace) so that it parses
and matches the schema, on either endpoint; max_tokens reached first: "length" and the text so
far; a "stop" text met inside the JSON ends it there ("stop", a text that does not parse). With --chat and "tools": "tool_choice": {"type": "function", "function": {"name": X}} gives
one call of X ("arguments": the generated object of X's "parameters" schema; "content" null;
finish_reason "stop", vLLM's), "tool_choice": "required" one or more calls of the tools (a JSON
array of {"name", "parameters"}, one with "parallel_tool_calls": false; finish_reason
"tool_calls"), without --tool-call-parser; streamed, such calls go out at the end, constrained
content as any text. Each row has its own grammar (a batch's free rows answer as alone). A bad
schema, a function not in "tools", a forced call on /v1/completions (a "prompt" is answered as
text) and a constraint with beams (not served) are a 400 naming the field.

Prompts, as OpenAI's API takes them: /v1/completions' "prompt" is a string, an array of strings,
an array of token ids (one prompt) or an array of arrays of token ids. Token ids run as given,
after the request's prefix as a text prompt's tokens do, no start token added (a text prompt
has the tokenizer's, except after a prompt prefix, which carries it: give ids alike); each is
checked to be in the model's vocabulary (a 400 naming its place, 'prompt'[i][j]); an echo of
them is their text, decoded. Each prompt of an array gives its "n" choices, index
prompt_index * n + j (OpenAI's order), each the answer the prompt alone gets; "usage" adds up
the prompts' tokens. A request's choices (prompts x n, at most 2048) are rows the worker runs
--batch-size at a time with the other requests'. An empty array, an empty array of ids and an
array mixing kinds are a 400; an empty string is what it is in generate (it continues a
prompt prefix; with no tokens at all, a 400). That is what lm-evaluation-harness's
local-completions sends (token ids by default; several prompts with batch_size above 1).

Log probabilities, as OpenAI's API gives them: /v1/completions' "logprobs": K (0 to 5) gives
each choice "logprobs": {"tokens", "token_logprobs", "top_logprobs" (the K likeliest tokens of
each position, the chosen one added), "text_offset"} for its generated tokens; chat's
"logprobs": true with "top_logprobs": K (0 to 20) gives {"content": [{"token", "logprob",
"bytes", "top_logprobs"}]}. They are the model's distribution after the request's prefix
(log_softmax of the logits, before temperature, top-p / top-k / min-p and the repetition
penalty: vLLM's default), from one more forward pass of prompt + completion for the batch's
scored rows. A token is its text decoded alone; one that is part of a UTF-8 character is
"bytes:\\xNN" where the tokenizer knows its bytes (the byte tokenizer, <0xNN> tokens, byte-level
BPE: GPT-2's, Llama 3's, Qwen's scheme), else its decoding holding U+FFFD; chat's "bytes" are
each token's own there (joined: the content's UTF-8). "echo": true (completions) puts the prompt
before the text and, with "logprobs", its tokens' entries first (the first one null); with
"max_tokens": 0 the prompt is scored alone in one forward pass, nothing generated
(lm-evaluation-harness's loglikelihood request); streamed, below. "n": N (1 to --batch-size)
gives N choices of each prompt, index 0..N-1 for one, each its own row, sampled independently
(greedy: N equal ones); "usage" counts each prompt once.

Streaming ("stream": true), as OpenAI's API streams: a 200 of Content-Type text/event-stream, one
"data: {chunk}" event per piece of text as it is generated ("object": "text_completion", or
"chat.completion.chunk" whose first "delta" is {"role": "assistant", "content": ""}, then
{"content": piece}), a last chunk with the finish_reason, with "stream_options":
{"include_usage": true} a chunk of no choices and the usage (the others with "usage": null),
then "data: [DONE]" (with "n", each chunk carries its choice's index, each choice its own
finish_reason chunk). The pieces add up to the answer the same request gets unstreamed: text goes
out once stable (a character whose bytes all came, a token's text once the next token is
there, no tail that may start a stop text); a row ends at its stop id or stop text at once.
Streamed requests share batches with the others. Beam search does not stream (transformers'):
its answer comes in one piece when its batch ends. An error before the stream begins is the
error below; after, an event of OpenAI's error object, then [DONE]. A client gone mid-stream:
its row stops at its next token, the batch goes on.

Streamed log probabilities ("logprobs" of completions, "logprobs" / "top_logprobs" of chat, with
"stream": true), as vLLM and OpenAI stream them: each chunk's choice carries the entries of its
tokens ({"tokens", "token_logprobs", "top_logprobs", "text_offset"}, offsets counted from the
start of the text across chunks; chat's {"content": [...]}), null in the others. They are taken
as the batch generates (a forward hook keeps each step's log_softmax of the raw logits, before
temperature and the other processors, as unstreamed), no second forward pass; concatenated over
the chunks they are the unstreamed answer's, within float rounding (a step's logits after the KV
cache). A token's entry goes with the chunk that sends the last of its text; a stop text's tokens
and any whose text is still held come with the choice's last text chunk ("text" maybe ""), before
its finish_reason chunk; beam search's come whole there. Text a tool-call parser or a forced
call holds back is not waited for: the entries go out as the text becomes stable, in chunks whose
content may be empty.

Streamed echo ("echo": true with "stream": true, as vLLM and OpenAI's legacy completions stream
it): each choice's first chunk is its prompt's text (a token-id prompt's decoded) with, where
"logprobs" asks, its prompt tokens' entries (the first one null), scored by one forward of the
batch's such prompts after their prefixes before it generates; then its completion's chunks as
above, their text_offset counted after the prompt; with "max_tokens": 0, the prompt's chunk, then
the finish chunk. Joined, each choice is the unstreamed answer's (text and text_offset exactly,
log probabilities within float rounding). An empty prompt after a prompt prefix (its head entry)
has no prompt chunk, as it has no entries unstreamed.

Batching (static): one worker thread owns the model. Rows (a request's choices) that come within
--batch-wait-ms of the first one waiting (up to --batch-size of them) are gathered; those
decoded alike (equal settings, as generate groups them) share a model.generate call, by prompt
length; the others wait for the batch to end. A batch that runs out of device memory is retried
in halves; a request that still does alone is answered 503 and the server goes on. After a
split, the size of the first part that then ran is the most rows any later batch tries, of any
request, for as long as the server runs (cut into parts of it before trying; another split
lowers it, nothing raises it: restart the server to try more), as generate does within a run:
one failed try, not one a batch. A row that fails (out of memory alone, a bug in its generate
call, a prompt too long) fails its request: the request is answered that error, and its other
rows are given up as a client gone's are (passed over while they wait, stopped at their next
token while their batch runs): no work for an answer no one gets.

Errors are OpenAI's JSON, {"error": {"message", "type", "param", "code"}}: 400 for a body that
is not a JSON object, a bad field (the message generate gives for it) or a prompt too long for
the model's positions (code "context_length_exceeded"); 404 for an unknown prefix ("model" or
"prefix"; code "model_not_found") or path; 405 for another method (HEAD: a GET's headers);
411 without Content-Length; 413 for a body over 32 MiB; 401 without the API key; 408 for a body
not all sent in time; 503 for out of memory alone, while stopping and beyond --max-connections;
500 for anything else (its traceback on stderr; the server goes on).

Metrics (GET /metrics, as vLLM's and TGI's, for Prometheus to scrape; prefix_attn.serve_metrics):
prefix_attn_requests_total{endpoint,status} (requests answered, by path, "other" for an unknown
one, and status, 499 for a client gone), prefix_attn_model_requests_total{model} (completion
requests answered 200, by prefix or base model id, each from 0), prefix_attn_prompt_tokens_total and
prefix_attn_generation_tokens_total (those requests' "usage" added up), the same by model:
prefix_attn_model_prompt_tokens_total{model} and prefix_attn_model_generation_tokens_total{model},
prefix_attn_request_success_total{model,finished_reason} (vLLM's: choices ended, by "stop",
"length", "tool_calls", or "error" for each choice of a request answered an error once queued:
a prompt too long, out of memory, stopping; each from 0), the gauges
prefix_attn_requests_waiting and prefix_attn_requests_running (rows, a request's choices: queued
or gathered; in the model.generate call running), and the histograms
prefix_attn_request_latency_seconds{endpoint} (request read to answer sent, a stream ended; buckets
0.01 to 300 s), prefix_attn_batch_size (rows per model.generate call; buckets 1 to 2048),
prefix_attn_time_to_first_token_seconds (a completion request read to its first token: streamed,
its first chunk of generated text sent, or a choice's end where none came before; else the first
token its batch generated; none for max_tokens 0; buckets 0.001 to 300 s) and
prefix_attn_request_time_per_output_token_seconds ((latency - time to first token) / (tokens of
its longest choice - 1), for answers of two tokens or more; buckets 0.001 to 10 s). Open
as /health is, except with --api-key (below), which guards it as /v1/: its series name the
prefixes. Connections refused beyond --max-connections are not counted (nothing is read of them).

Exposed beyond localhost (--host 0.0.0.0): the server speaks plain HTTP, so put a TLS proxy in
front of it (nginx, Caddy) for anything but a trusted network. --api-key KEY (else the
environment variable PREFIX_ATTN_API_KEY; better than the command line, which other users of the
machine may see) makes every /v1/ request and /metrics carry "Authorization: Bearer KEY", compared
in constant time, else a 401 ("code": "invalid_api_key", as OpenAI's API answers; /metrics is
guarded where vLLM leaves it open: its series name the prefixes, so a Prometheus scrape gives the
key as its "authorization" credentials); /health and the tokenizer endpoints stay open (vLLM's --api-key
alike; without the key, their 404 for an unknown "model" lists no prefix); the key is never printed. A client that closes its
connection (or its sending half) before its answer has its rows given up: passed over while they
wait, stopped at their next token while their batch runs (the batch goes on), as a streamed
client gone is; its log line says 499. --request-timeout S (10): each read of a request's line
and headers must come within S seconds (else the connection is closed, no answer) and its whole
body within S seconds of its headers (else 408; a body ended early: 400). --max-connections N
(256): connections served at once, each a thread; one more is answered 503 at once
("too_many_connections"), without a thread.

Everything is checked and loaded before the server listens (the model, every prefix, --chat's
template, the address: a port in use is an error before the model loads); then one line on
stderr says where it listens, and one line per request gives its method, path, status,
completion tokens and milliseconds (none with --quiet). Ctrl-C or SIGTERM stops it: a request in
flight or waiting is answered 503, and the command ends with exit status 130 / 143.
"""
from __future__ import annotations

import argparse
import gc
import hmac
import json
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, List, Optional, Tuple

import torch
from transformers import StoppingCriteria

from . import (chat as chat_template, cli_args, cli_parsers, jsonl, serve, serve_batching, serve_logprobs,
               serve_fields, serve_metrics, serve_options, serve_stream, tool_calls)
from .backends import check_env_backend
from .serve_fields import HTTPError
from .serve_stop import until_stop_id
from .serve_inputs import (Request, RequestError, prefix_sources, request_of, warn_about_adapter_bases,
                           warn_about_sampling_options)
from .train_state import Interrupted, StopSignals

__all__ = ["main", "add_parser", "Server"]

TINY_ID = "prefix-attn-tiny"  # the built-in model's id (no --model)
MAX_BODY = 32 * 2 ** 20
_SERVER_LOG = "prefix-attn serve"
API_KEY_ENV = "PREFIX_ATTN_API_KEY"  # --api-key's default, as vLLM's VLLM_API_KEY
_POLL_S = 0.1  # how often a handler waiting for its answer looks whether its client is gone

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` subcommand to an ``argparse`` subparsers object."""
    return cli_parsers.add_parser(subparsers, "serve", run)


class _Stopping(StoppingCriteria):
    """A stopping criterion: every row is done once ``event`` is set, so a batch in flight ends
    when the server stops, and once every one of ``pending`` (the batch's rows) is cancelled
    (their clients gone); with ``per_row`` (a row each: no beams), a cancelled row is done alone.
    Called after each step, its first call stamps the rows' ``first`` (their first token's time)."""

    def __init__(self, event: threading.Event, pending: List["_Pending"], per_row: bool):
        self.event, self.pending, self.per_row = event, pending, per_row
        self.stamped = False

    def __call__(self, input_ids, scores, **kwargs):
        if not self.stamped:  # a batch retried in halves: the try that answers stamps last
            self.stamped, now = True, time.monotonic()
            for p in self.pending:
                p.first = now
        cancelled = [p.cancelled for p in self.pending]
        if self.per_row and any(cancelled) and not all(cancelled) and not self.event.is_set():
            return torch.tensor(cancelled, dtype=torch.bool, device=input_ids.device)
        done = self.event.is_set() or (bool(cancelled) and all(cancelled))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class _Pending:
    """A row of a request waiting for the worker (choice ``index`` of its "n"): answered once, by
    ``resolve``. A streamed one (``stream``) also has ``events``, a queue its request's rows share,
    read by its handler: ``(index, "start", "")`` when its batch starts generating,
    ``(index, "text", DELTA)`` for each piece of stable text, ``(index, "end", "")`` once
    resolved, each with a fourth item, the "logprobs" of the tokens of that piece (None: none);
    with "echo", ``(index, "echo", PROMPT)`` first, the prompt's entries with it where asked.
    Its handler cancels it (:meth:`cancel`) when the client is gone. ``rows``: its request's rows
    (itself among them); one failing (answered an error) gives the others up (:meth:`give_up`)."""

    def __init__(self, request: Request, stream: bool = False, asked: serve_fields.Asked = serve_fields.Asked(), index: int = 0,
                 events: "Optional[queue.Queue[Tuple[int, str, str, Optional[dict]]]]" = None):
        self.request, self.asked, self.index = request, asked, index  # index: its choice's
        self.job = None  # serve._Job, once planned
        self.settings: Optional[serve_options.Decoding] = None
        self.answer: Optional[Tuple[str, int, str]] = None
        self.logprobs: Optional[dict] = None  # its choice's "logprobs", when asked
        self.streamed: Optional[serve_logprobs.Streamed] = None  # its logprobs as they stream, when asked
        self.error: Optional[HTTPError] = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        # a request's choices share one queue: each event says its choice's index
        self.events = (events if events is not None else queue.Queue()) if stream else None
        self.rows: List[_Pending] = [self]  # its request's, set by Server.submit
        self.sent = False  # text went out: a retried batch would send it again
        self.echoed = False  # its streamed echo went out (the prompt: the same in a retried batch)
        self.cancelled = False
        self.first: Optional[float] = None  # time.monotonic() once its batch generated its first token

    def push(self, kind: str, text: str = "", logprobs: Optional[dict] = None) -> None:
        """An event for a streamed request's handler (nothing for another, or once resolved)."""
        if self.events is not None and not self.done.is_set():
            self.sent = self.sent or kind == "text"
            self.events.put((self.index, kind, text, logprobs))

    def cancel(self) -> None:
        """Its client is gone: given up with an error no one reads."""
        self.give_up(HTTPError(499, "the client closed its connection", code="client_gone"))

    def give_up(self, error: HTTPError) -> None:
        """No one waits for its answer (its client gone, or another row of its request failed):
        answered ``error``, so the worker passes it over, and ``cancelled``, so a batch running
        it stops it at its next token."""
        self.cancelled = True
        self.resolve(error=error)

    def resolve(self, answer=None, error: Optional[HTTPError] = None, logprobs: Optional[dict] = None) -> None:
        """Answered once (later calls do nothing); answered an error, the other rows of its
        request are given up with that error, the request's answer (unless this one was)."""
        with self._lock:
            if self.done.is_set():
                return
            self.answer, self.error, self.logprobs = answer, error, logprobs
            self.done.set()
            if self.events is not None:
                self.events.put((self.index, "end", "", None))
        if error is not None and not self.cancelled:
            for other in self.rows:
                if other is not self:
                    other.give_up(error)


class Server:
    """``prefix-attn serve``: everything checked and loaded, the address bound (not listening
    yet). :meth:`serve_forever` listens and answers until :meth:`shutdown` (from another
    thread) or a signal; :meth:`close` (always call it) answers what is left with 503."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.log = args, not args.quiet
        self.api_key = api_key(args.api_key)
        device = serve._check_device(args.device)
        check_env_backend(device.type, "generation")
        sources = prefix_sources(args)
        problem = (chat_template.options_need_chat(args.chat_option, args.chat)
                   or tool_calls.need_chat(args.tool_call_parser, args.chat))
        if problem is not None:
            raise RequestError(problem)
        if args.chat:
            chat_template.check_template(args.model)
        self.model_id = args.model if args.model is not None else TINY_ID
        self.sources = {s.name: s for s in sources}
        if self.model_id in self.sources:
            raise RequestError(f"prefix name {self.model_id!r} is the base model's id, which means no prefix; "
                               "give the prefix another name")
        warn_about_sampling_options(args, [], "", command="serve")
        warn_about_adapter_bases(sources, args.model, command="serve")
        self.httpd = _HTTPServer((args.host, args.port), _Handler, bind_and_activate=False)
        self.httpd.slots = threading.BoundedSemaphore(args.max_connections)
        try:
            self.httpd.server_bind()  # a port in use: said before the model loads
        except OSError as exc:
            self.httpd.server_close()
            raise RequestError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
        self.httpd.app = self
        try:
            self.served = serve.load(args, device, sources, command="serve")
            torch.manual_seed(args.seed)  # after loading: building the default model seeds torch itself
            self.httpd.server_activate()
        except BaseException:
            self.httpd.server_close()
            raise
        self.vocab_size = self.served.model.get_input_embeddings().num_embeddings
        self.max_model_len = cli_args.max_positions(self.served.model.config)  # None: no limit known
        self.created = int(time.time())
        self.stopping = threading.Event()
        self._queue: "queue.Queue[_Pending]" = queue.Queue()
        self._inflight: List[_Pending] = []
        self._running: List[_Pending] = []  # the rows of the model.generate call running now
        # the most rows a batch tries since one ran out of memory, kept across requests (generate's)
        self._fitting = serve_batching.Fitting()
        self.metrics = serve_metrics.Metrics(_ROUTES, [self.model_id, *self.sources], self._load)
        self._count = 0
        self._count_lock = threading.Lock()
        self._submit = threading.Lock()  # queueing a request, or stopping
        self._taking = threading.Lock()  # the worker taking a row from the queue, or close() counting them
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="prefix-attn serve worker", daemon=True)

    @property
    def address(self) -> Tuple[str, int]:
        return self.httpd.server_address[:2]

    def serve_forever(self, signals: Optional[StopSignals] = None) -> None:
        """Answer until :meth:`shutdown` or, with ``signals``, a stop signal (raises Interrupted)."""
        self.httpd.stop_signals = signals
        self._worker.start()
        self.httpd.serve_forever(poll_interval=0.1)

    def shutdown(self) -> int:
        """From another thread than :meth:`serve_forever`'s: stop listening, then :meth:`close`."""
        self.httpd.shutdown()
        return self.close()

    def close(self) -> int:
        """Stop: requests in flight or waiting are answered 503 (a batch in flight ends at its
        next token); returns how many were. Later calls do nothing."""
        if self._closed:
            return 0
        self._closed = True
        with self._submit, self._taking:  # no request is queued from now on, nor taken while counted
            self.stopping.set()
            waiting = [p for p in self._inflight + list(self._queue.queue) if not p.done.is_set()]
        try:
            if self._worker.is_alive():
                self._worker.join(timeout=60)
        finally:  # a second Ctrl-C while the batch ends: the handlers (not daemons) are answered all the same
            for p in waiting + self._drain():
                p.resolve(error=serve_fields.stopping_error())
            self.httpd.server_close()  # waits for the handlers, which answer now
        return len(waiting)

    def _drain(self) -> List[_Pending]:
        drained = []
        while True:
            try:
                drained.append(self._queue.get_nowait())
            except queue.Empty:
                return drained

    def _load(self) -> Tuple[int, int]:
        """(rows waiting, rows running) now, for /metrics: the rows not yet answered that are
        queued or gathered and not in the model.generate call running, and those in it."""
        with self._queue.mutex:
            queued = list(self._queue.queue)
        running = {id(p) for p in self._running if not p.done.is_set()}
        waiting = {id(p) for p in queued + self._inflight if not p.done.is_set()} - running
        return len(waiting), len(running)

    def say(self, message: str) -> None:
        print(f"{_SERVER_LOG}: {message}", file=sys.stderr, flush=True)

    # -- requests (handler threads) --------------------------------------------------------

    def models(self) -> dict:
        """``GET /v1/models``: the base model, then every prefix with the base as its parent."""
        base = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "prefix-attn",
                "root": self.model_id, "parent": None}
        prefixes = [{"id": name, "object": "model", "created": self.created, "owned_by": "prefix-attn",
                     "root": s.value if s.option != "--prompt-prefix" else name, "parent": self.model_id,
                     "source": s.option.lstrip("-")}
                    for name, s in self.sources.items()]
        return {"object": "list", "data": [base] + prefixes}

    def submit(self, obj: Any, chat: bool) -> List[_Pending]:
        """A completion (``chat``: a chat completion) request body ``obj`` checked and queued
        for the worker (streamed if its "stream" is true): one row per choice, ``n`` of each
        prompt (choice ``prompt_index * n + j``, as OpenAI's API numbers them), each sampled on its
        own, run in the batches the worker gathers; raises HTTPError."""
        requests = self._requests(obj, chat)
        asked, stream = serve_fields.asked(obj, chat, self.args.batch_size), obj.get("stream") is True
        events: "queue.Queue[Tuple[int, str, str, Optional[dict]]]" = queue.Queue()
        pending = [_Pending(r, stream, asked, i * asked.n + j, events)
                   for i, r in enumerate(requests) for j in range(asked.n)]
        for p in pending:
            p.rows = pending
        with self._submit:
            if self.stopping.is_set():
                raise serve_fields.stopping_error()
            for p in pending:
                self._queue.put(p)
        return pending

    def name(self, pending: _Pending) -> str:
        """The "model" of an answer: the prefix's name, or the base model's id."""
        return pending.request.prefix if pending.request.prefix is not None else self.model_id

    @staticmethod
    def usage(pending: List[_Pending]) -> dict:
        """The usage of a request's choices: each of its prompts once, every choice's tokens."""
        prompts = {id(p.request): len(p.job.ids) for p in pending}  # the n choices of a prompt share it
        prompt, count = sum(prompts.values()), sum(p.answer[1] for p in pending)
        return {"prompt_tokens": prompt, "completion_tokens": count, "total_tokens": prompt + count}

    def complete(self, obj: Any, chat: bool, gone: Callable[[], bool] = lambda: False,
                 start: Optional[float] = None) -> Tuple[dict, int]:
        """The answer to a completion (``chat``: a chat completion) request body ``obj`` (not
        streamed), and its completion tokens; raises HTTPError, or ClientGone once ``gone()``
        holds while it waits (its rows cancelled: passed over, or stopped at their next token).
        ``start``: when the request was read (time.monotonic(); default now), for /metrics'
        time to first token (its batch's first token) and time per output token."""
        start = time.monotonic() if start is None else start
        pending = self.submit(obj, chat)
        for p in pending:
            while not p.done.wait(_POLL_S):
                if gone():
                    for q in pending:
                        q.cancel()
                    raise ClientGone()
        error = next((p.error for p in pending if p.error is not None), None)
        if error is not None:
            self.metrics.failed(self.name(pending[0]), len(pending))
            raise error
        usage = self.usage(pending)
        choices = [_choice(p, chat, self.served.tool_calls(p.request, p.answer[0])) for p in pending]
        stamps = [p.first for p in pending if p.first is not None]
        first = min(stamps) - start if stamps else None  # none generated (max_tokens 0): none
        self.metrics.answered(self.name(pending[0]), usage, [c["finish_reason"] for c in choices],
                              first, per_token(time.monotonic() - start, first, pending))
        kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        return ({"id": f"{kind[0]}-{uuid.uuid4().hex}", "object": kind[1], "created": int(time.time()),
                 "model": self.name(pending[0]), "usage": usage, "choices": choices}, usage["completion_tokens"])

    # -- the tokenizer, as vLLM serves it (handler threads: the tokenizer is only read) ------

    def tokenize(self, obj: Any, known: bool = True) -> dict:
        """``POST /tokenize``: the token ids a request's "prompt" (a string; "messages" with
        --chat) runs after the prefix its "model" (or "prefix") names: a text's with the
        start token where "add_special_tokens" (default true) and not after a prompt prefix,
        a conversation's from the chat template ("add_special_tokens" not applied). ``known``:
        an unknown prefix's 404 lists the server's (not to a client without the API key)."""
        if not isinstance(obj, dict):
            raise HTTPError(400, f"the body must be a JSON object, got {type(obj).__name__}")
        need, other = ("messages", "prompt") if self.args.chat else ("prompt", "messages")
        if other in obj:
            raise HTTPError(400, f"'{other}' is not tokenized by this server ({'with' if self.args.chat else 'without'}"
                                 f" --chat, as its completions endpoint): give '{need}'", param=other)
        if need not in obj:
            raise HTTPError(400, f"missing '{need}'", param=need)
        special = obj.get("add_special_tokens")
        if special is not None and not isinstance(special, bool):
            raise HTTPError(400, f"'add_special_tokens' must be true or false, got {json.dumps(special)}",
                            param="add_special_tokens")
        strings = serve_fields.flag(obj, "return_token_strs")
        fields = {k: obj[k] for k in (need, "tools", "add_generation_prompt", "continue_final_message") if k in obj}
        fields["prefix"] = self._prefix(obj, known)
        try:
            request = request_of(fields, "request", 1)
            ids = self.served.request_ids(request, "request", special is not False)
        except RequestError as exc:
            raise HTTPError(400, serve_fields.one_line(exc), param=need) from None
        problem = serve.tiny.vocab_problem(self.served.tokenizer, ids, self.vocab_size)
        if problem is not None:
            raise HTTPError(400, problem, param=need)
        answer = {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}
        if strings:  # vLLM's: each id's token string, as the tokenizer names it
            answer["token_strs"] = list(self.served.tokenizer.convert_ids_to_tokens(ids))
        return answer

    def detokenize(self, obj: Any, known: bool = True) -> dict:
        """``POST /detokenize``: the text of "tokens" (ids of the model's vocabulary; special
        tokens kept, as vLLM's)."""
        if not isinstance(obj, dict):
            raise HTTPError(400, f"the body must be a JSON object, got {type(obj).__name__}")
        if "tokens" not in obj:
            raise HTTPError(400, "missing 'tokens'", param="tokens")
        self._prefix(obj, known)  # an unknown "model" is a 404, as elsewhere
        ids = obj["tokens"]
        if not isinstance(ids, list):
            raise HTTPError(400, f"'tokens' must be an array of token ids, got {jsonl.json_type(ids)}", param="tokens")
        ids = serve_fields.token_ids(ids, "'tokens'", self.vocab_size, param="tokens", empty=True)
        return {"prompt": self.served.tokenizer.decode(ids, skip_special_tokens=False)}

    def tokenizer_info(self) -> dict:
        """``GET /tokenizer_info``: the tokenizer's class and special tokens (null where it has
        none: the byte tokenizer's are ids with no text), the model's positions, the chat
        template where the tokenizer has one."""
        tok = self.served.tokenizer
        info = {"tokenizer_class": type(tok).__name__, "model_max_length": self.max_model_len}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = value if isinstance(value, str) else None
        template = getattr(tok, "chat_template", None)
        if isinstance(template, str):
            info["chat_template"] = template
        return info

    def _requests(self, obj: Any, chat: bool) -> List[Request]:
        """A request body checked as a line of generate's request file is (and more): one
        Request per prompt of its "prompt" (:func:`serve_fields.prompts`: text, or token ids)."""
        if not isinstance(obj, dict):
            raise HTTPError(400, f"the body must be a JSON object, got {type(obj).__name__}")
        if chat and not self.args.chat:
            raise HTTPError(400, "/v1/chat/completions needs the server started with --chat "
                                 "(the tokenizer's chat template): use /v1/completions")
        if not chat and self.args.chat:
            raise HTTPError(400, "this server runs with --chat (its prompt prefixes are system messages): "
                                 "use /v1/chat/completions")
        need, other = ("messages", "prompt") if chat else ("prompt", "messages")
        if need not in obj:
            raise HTTPError(400, f"missing '{need}'", param=need)
        if other in obj:
            raise HTTPError(400, f"'{other}' is not a field of this endpoint: give '{need}'", param=other)
        for name, fine in serve_fields.UNSUPPORTED.items():
            if name in obj and not any(serve_fields.same(obj[name], value) for value in fine):
                raise HTTPError(400, f"{name}={json.dumps(obj[name])} is not supported", param=name, code="unsupported")
        serve_fields.check_stream(obj)
        asked = serve_fields.asked(obj, chat, self.args.batch_size)
        prompts = None if chat else serve_fields.prompts(obj["prompt"], self.vocab_size)
        if prompts is not None and len(prompts) * asked.n > serve_fields.MAX_CHOICES:
            raise HTTPError(400, f"{len(prompts)} prompts x n {asked.n} = {len(prompts) * asked.n} choices, over the "
                                 f"{serve_fields.MAX_CHOICES} a request may ask: split the prompts over several requests",
                            param="prompt")
        fields = {k: v for k, v in obj.items() if k not in ("model", "id")
                  and not (asked.score_only and k in serve_fields.MAX_TOKENS_FIELDS)}  # checked: 0, with echo
        fields["prefix"] = self._prefix(obj)
        if prompts is not None:
            fields["prompt"] = ""  # each prompt's own below
        with self._count_lock:
            self._count += 1
            number = self._count
        try:
            request = request_of(fields, "request", number)
        except RequestError as exc:
            raise HTTPError(400, serve_fields.one_line(exc), param=exc.param) from None
        if obj.get("seed") is not None and not asked.score_only and \
                serve_options.Decoding.of(self.args, request.options).do_sample:
            raise HTTPError(400, serve_fields.SEED_REFUSED, param="seed", code="unsupported")
        if prompts is None:
            return [request]
        return [replace(request, prompt=p) if isinstance(p, str) else replace(request, prompt=None, ids=p)
                for p in prompts]

    def _prefix(self, obj: dict, known: bool = True) -> Optional[str]:
        """The prefix a request names by "model" (the base model's id: none) or "prefix";
        ``known``: an unknown name's 404 lists (and suggests) the server's prefixes."""
        named = {}
        for key in ("model", "prefix"):
            value = obj.get(key)
            if value is not None and not isinstance(value, str):
                raise HTTPError(400, f"'{key}' must be a string, got {type(value).__name__}", param=key)
            if value not in (None, "") and not (key == "model" and value == self.model_id):
                named[key] = value
        for key, name in named.items():
            if name not in self.sources:
                from prefix_attn.bank import did_you_mean

                listed = (f"{did_you_mean(name, list(self.sources))}; known: "
                          + ", ".join([self.model_id] + list(self.sources))) if known else ""
                raise HTTPError(404, f"The model {name!r} does not exist{listed}", param=key, code="model_not_found")
        if len(set(named.values())) > 1:
            raise HTTPError(400, f"'model' {named['model']!r} and 'prefix' {named['prefix']!r} name different "
                                 "prefixes: give one", param="prefix")
        return next(iter(named.values()), None)

    # -- the worker thread: the model's only user ------------------------------------------

    def _streamer(self, pending: List[_Pending], settings: serve_options.Decoding,
                  steps: Optional[serve_logprobs.Steps]) -> serve_stream.BatchStreamer:
        """The streamer of a batch: each streamed row's stable text to its handler as it comes,
        with the log probabilities of its tokens where asked (``steps`` keeps them), and its
        answer as soon as a stop id or a stop text ends it; the batch goes on."""
        served, names = self.served, serve_logprobs.Names(self.served.tokenizer)

        def row(p: _Pending):
            text = serve_stream.RowText(served.tokenizer, served.stop, served.pad_id, settings.stop, settings.special)
            start = len(p.request.prompt) if p.asked.echo else 0  # the completion's text_offset: after the echo
            p.streamed = (serve_logprobs.Streamed(names, p.asked.logprobs, p.request.messages is not None, served.pad_id,
                                                  start) if steps is not None and p.asked.logprobs is not None else None)

            def take(token: int, scores: Optional[tuple]) -> None:
                if p.cancelled or p.done.is_set():
                    return
                delta = text.add(token)
                if p.streamed is not None and token not in served.stop:
                    p.streamed.add(token, *scores)
                logprobs = p.streamed.ready(len(text.sent)) if p.streamed is not None else None
                if delta or logprobs:
                    p.push("text", delta, logprobs)
                if text.done:
                    p.resolve(answer=served.finish(text.new, settings))
            p.push("start")
            return take
        return serve_stream.BatchStreamer([row(p) if p.events is not None else None for p in pending], steps)

    def _steps(self, pending: List[_Pending]) -> Optional[serve_logprobs.Steps]:
        """What keeps the log probabilities of the streamed rows of a batch that ask for them as
        they are generated (None: none asks)."""
        rows = [i for i, p in enumerate(pending) if p.events is not None and p.asked.logprobs is not None]
        if not rows:
            return None
        return serve_logprobs.Steps(self.served.model, rows, max(pending[i].asked.logprobs for i in rows))

    def _echo(self, pending: List[_Pending]) -> None:
        """The echo of each streamed row asking for one, once (not again when its batch is retried
        in halves): its prompt's text, the first event of its choice, with the entries of its
        prompt's tokens where it asks for log probabilities (the first one null; none for a
        prompt prefix's head entry, as unstreamed), all such rows scored by one forward of their
        prompts after their prefixes (:func:`serve_logprobs.score`, as an unstreamed echo's)."""
        rows = [p for p in pending if p.events is not None and p.asked.echo and not p.echoed]
        scored = [p for p in rows if p.asked.logprobs is not None and p.job.prefix == p.request.prefix]
        entries = {}
        if scored:
            served, names = self.served, serve_logprobs.Names(self.served.tokenizer)
            wanted = [serve_logprobs.Row(p.job.prefix, p.job.ids, [], True, p.asked.logprobs) for p in scored]
            for p, got in zip(scored, serve_logprobs.score(served.model, wanted, served.pad_id, served.device)):
                entries[id(p)] = serve_logprobs.completion_logprobs(got, names, len(p.job.ids), 0)
        for p in rows:
            p.echoed = True
            if p.request.prompt or id(p) in entries:
                p.push("echo", p.request.prompt, entries.get(id(p)))

    def _take(self, timeout: float) -> bool:
        """A row from the queue into ``_inflight`` within ``timeout`` seconds (False: none came)."""
        with self._taking:  # close() counts the rows taken: none is between the queue and _inflight
            try:
                self._inflight.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return False
        return True

    def _work(self) -> None:
        wait = self.args.batch_wait_ms / 1000
        while not self.stopping.is_set():
            self._inflight = []
            if not self._take(_POLL_S):
                continue
            deadline = time.monotonic() + wait
            # batch-mates, for up to --batch-wait-ms (60 s at most): a stop ends the wait at once
            while len(self._inflight) < self.args.batch_size and not self.stopping.is_set():
                left = deadline - time.monotonic()
                if not self._take(min(max(left, 0), _POLL_S)) and left <= _POLL_S:
                    break
            gathered = self._inflight
            try:
                self._answer(gathered)
            except Exception as exc:  # a bug: every request still waiting fails, the server goes on
                self._internal_error(gathered, exc)
            self._inflight = []

    def _internal_error(self, pending: List[_Pending], exc: BaseException) -> None:
        self.say("internal error:\n" + "".join(traceback.format_exception(exc)).rstrip())
        for p in pending:
            p.resolve(error=HTTPError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    def _answer(self, gathered: List[_Pending]) -> None:
        ready = [p for p in gathered if not p.done.is_set() and self._plan(p)]  # done: its client gone
        lengths, keys = [len(p.job.ids) for p in ready], [p.settings.key for p in ready]
        for batch in serve_batching.by_setting(lengths, keys, self.args.batch_size):
            try:
                serve_batching.in_halves_on_oom(lambda part: self._run([ready[i] for i in part]), batch,
                                                self.served.device, self.say, self._fitting)
            except Exception as exc:
                self._internal_error([ready[i] for i in batch], exc)
            finally:
                self._running = []  # its rows answered

    def _plan(self, p: _Pending) -> bool:
        """Tokenise a request and check its length; False (answered 400, or 500) when it cannot run."""
        try:
            [p.job] = self.served.plan([p.request], "request")
            if p.request.prompt is None and p.request.ids is not None:  # its text: the echo, text offsets
                p.request.prompt = self.served.tokenizer.decode(p.request.ids, skip_special_tokens=True)
            p.settings = self.served.settings(self.args, p.request)
            if p.asked.score_only:  # nothing generated: every such request shares a batch
                p.settings = replace(p.settings, max_new_tokens=0, do_sample=False, num_beams=1,
                                     repetition_penalty=1.0, stop=())
        except RequestError as exc:
            p.resolve(error=HTTPError(400, serve_fields.one_line(exc), param=exc.param))
            return False
        except Exception as exc:  # a bug met by this request: a 500 for it, not for all gathered with it
            self._internal_error([p], exc)
            return False
        try:
            self.served.check_lengths([p.job], [p.settings], "request")
        except RequestError as exc:
            p.resolve(error=HTTPError(400, serve_fields.one_line(exc), param="prompt", code="context_length_exceeded"))
            return False
        return True

    def _run(self, pending: List[_Pending]) -> None:
        """One model.generate call for ``pending`` (decoded alike; those already answered left
        out), streamed rows given their text as it comes. Out of memory: raised for several
        (in_halves_on_oom splits them), a 503 for one alone and for a stream that sent text."""
        pending = [p for p in pending if not p.done.is_set()]
        if pending and not self.stopping.is_set():
            settings = pending[0].settings
            streams = any(p.events is not None for p in pending) and settings.num_beams == 1
            self._running = pending  # until its batch is done (_answer)
            try:
                news = self._outputs(pending, settings, streams)
            except serve_batching.OutOfMemoryError as exc:
                message = serve.tiny._first_line(exc)
                for p in pending:
                    if p.sent or len(pending) == 1:  # its text cannot be taken back: not retried
                        p.resolve(error=_out_of_memory(p, settings, message, len(pending)))
                if len(pending) > 1:
                    raise
                news = None
            if news is None:  # out of the handler: the failed call's tensors are gone
                gc.collect()
                if self.served.device.type == "cuda":
                    torch.cuda.empty_cache()
                return
            if not self.stopping.is_set():
                for p, (answer, logprobs) in zip(pending, news):
                    p.resolve(answer=answer, logprobs=logprobs)
                return
        for p in pending:
            p.resolve(error=serve_fields.stopping_error())

    def _outputs(self, pending: List[_Pending], settings: serve_options.Decoding,
                 streams: bool) -> List[Tuple[Tuple[str, int, str], Optional[dict]]]:
        """Each row's answer (Served.finish's) and its "logprobs" (None unless asked): one
        model.generate call (none for max_tokens 0), then one forward scoring the rows that ask."""
        news = [[] for _ in pending]
        self._echo(pending)  # before the streamed log probabilities' hook: its forward is not a step
        if settings.max_new_tokens:
            self.metrics.batch(len(pending))
            steps = self._steps(pending) if streams else None
            try:
                news = self.served.generate([p.job for p in pending], settings,
                                            [_Stopping(self.stopping, pending, per_row=settings.num_beams == 1)],
                                            streamer=self._streamer(pending, settings, steps) if streams else None)
            finally:
                if steps is not None:
                    steps.close()
        answers = [self.served.finish(new, settings) for new in news]
        logprobs: List[Optional[dict]] = [None] * len(pending)
        asking = [i for i, p in enumerate(pending)  # a streamed row's came as it was generated
                  if p.asked.logprobs is not None and not p.cancelled and p.streamed is None
                  and not (p.echoed and not answers[i][1])]  # an echo streamed, nothing more to score
        if asking and not self.stopping.is_set():
            served, rows = self.served, []
            for i in asking:
                p, count = pending[i], answers[i][1]
                tokens = until_stop_id(news[i], served.stop, served.pad_id)[0][:count]
                # not a prompt's head entry, nor a prompt whose entries were streamed (_echo)
                echo = p.asked.echo and p.job.prefix == p.request.prefix and not p.echoed
                rows.append(serve_logprobs.Row(p.job.prefix, p.job.ids, tokens, echo, p.asked.logprobs))
            names = serve_logprobs.Names(served.tokenizer)
            for i, scored in zip(asking, serve_logprobs.score(served.model, rows, served.pad_id, served.device)):
                p = pending[i]
                echoed = len(p.job.ids) if rows[asking.index(i)].echo else 0
                start = len(p.request.prompt) if p.asked.echo else 0
                logprobs[i] = (serve_logprobs.chat_logprobs(scored, names) if p.request.messages is not None else
                               serve_logprobs.completion_logprobs(scored, names, echoed, start))
        return list(zip(answers, logprobs))


def _choice(p: _Pending, chat: bool, parsed: Optional[tool_calls.Parsed] = None) -> dict:
    """A choice of an answer (not streamed): its text (after the prompt with "echo"), its
    log probabilities when asked, its finish_reason; ``parsed``: the tool calls its text holds."""
    text, _, reason = p.answer
    if chat:
        message = {"role": "assistant", "content": text}
        if parsed is not None:
            message, reason = {**message, "content": parsed.content, "tool_calls": parsed.calls}, parsed.reason
        return {"index": p.index, "message": message, "logprobs": p.logprobs, "finish_reason": reason}
    return {"index": p.index, "text": p.request.prompt + text if p.asked.echo else text, "logprobs": p.logprobs,
            "finish_reason": reason}


def per_token(latency: float, first: Optional[float], pending: List[_Pending]) -> Optional[float]:
    """Seconds per output token of an answered request: (``latency`` - ``first``, its time to
    first token) / (the tokens of its longest choice - 1); None under two tokens or no first."""
    tokens = max(p.answer[1] for p in pending)
    return (latency - first) / (tokens - 1) if first is not None and tokens > 1 else None


def _out_of_memory(p: _Pending, settings: serve_options.Decoding, message: str, batch: int) -> HTTPError:
    where = "even alone" if batch == 1 else f"in a batch of {batch}, its stream begun"
    return HTTPError(503, f"ran out of device memory {where} ({len(p.job.ids)} prompt tokens + "
                          f"{settings.max_new_tokens} new tokens): {message}; lower max_tokens or shorten the prompt",
                     type="server_error", code="out_of_memory")


_ROUTES = {"/health": "GET", "/metrics": "GET", "/v1/models": "GET", "/v1/completions": "POST", "/v1/chat/completions": "POST",
           "/tokenize": "POST", "/detokenize": "POST", "/tokenizer_info": "GET"}


class ClientGone(Exception):
    """A request's client closed its connection before its answer: nothing to send."""


def api_key(given: Optional[str]) -> Optional[str]:
    """The key requests must carry: --api-key, else $PREFIX_ATTN_API_KEY (empty: none), else
    none; ValueError for one that cannot be a header's token."""
    key = given if given is not None else os.environ.get(API_KEY_ENV) or None
    where = "--api-key" if given is not None else f"environment variable {API_KEY_ENV}"
    if key is not None and not (key.isascii() and key.isprintable() and key and " " not in key):
        raise ValueError(f"{where}: the key must be printable ASCII without spaces, at least one character")
    return key


def _authorized(header: Optional[str], key: str) -> bool:
    """An Authorization header is 'Bearer KEY' (the scheme in any case), compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1", "replace"),
                                                                key.encode("ascii"))


def _readable(sock: socket.socket) -> bool:
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        return bool(selector.select(0))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close waits for the handlers to answer
    # the listen backlog: socketserver's 5 made a burst of clients (20 at once) see their
    # connections reset while the accept loop was behind
    request_queue_size = 128
    app: Server
    slots: threading.BoundedSemaphore  # a connection each, --max-connections
    stop_signals: Optional[StopSignals] = None

    def service_actions(self) -> None:
        """Each turn of the accept loop: a stop signal whose own raise was lost (handled inside a
        ``__del__`` or by a handler thread's start, which socketserver only prints) stops it."""
        super().service_actions()
        if self.stop_signals is not None:
            self.stop_signals.raise_if_received()

    def process_request(self, request, client_address) -> None:
        """A thread for the connection, or, --max-connections being served, a 503 at once."""
        if not self.slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:  # no thread started: its slot is free again
            self.slots.release()
            raise
        # a stop signal (BaseException) raised while the thread starts: the thread, started,
        # frees its slot itself

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """Answer 503 without reading the request (from the accept loop: a short write, no wait)."""
        limit = self.app.args.max_connections
        error = HTTPError(503, f"the server is serving {limit} connections, its most (--max-connections): retry later",
                          type="server_error", code="too_many_connections")
        data = json.dumps({"error": error.error}).encode("utf-8")
        head = (f"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode("ascii")
        try:
            request.settimeout(0)
            request.sendall(head + data)
            request.recv(65536)  # what came of the request: closing with it unread would reset the connection
        except OSError:
            pass
        self.shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    server_version = "prefix-attn"
    timeout = 60  # a client that stops reading its answer

    def setup(self) -> None:
        super().setup()
        # the request line and headers: each read within --request-timeout, else the
        # connection is closed (http.server's own handling, no answer)
        self.connection.settimeout(self.server.app.args.request_timeout)

    def log_message(self, format, *args) -> None:  # one line per request of our own (Server)
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_HEAD(self) -> None:  # a GET's status and headers, no body
        self._handle("HEAD")

    # any other method: 405 in OpenAI's JSON (http.server's own answer: a 501 in HTML)
    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_OPTIONS(self) -> None:
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        app, start, tokens = self.server.app, time.monotonic(), 0
        path = self.path.split("?", 1)[0]
        self._counted, self._start = False, start  # a stream counts itself before its [DONE]
        self.connection.settimeout(self.timeout)
        try:
            body, tokens = self._route(app, method, path)
            status = 200
            if body is None:  # streamed: answered
                self._log(app, method, path, status, *tokens, start, counted=self._counted)
                return
        except ClientGone:  # its rows given up; 499 (nginx's "client closed request"): the log's alone
            self._log(app, method, path, 499, 0, ", client gone", start)
            return
        except HTTPError as exc:
            status, body = exc.status, {"error": exc.error}
        except Exception as exc:  # a bug: logged, answered 500, the server goes on
            app.say(f"internal error in {method} {path}:\n" + "".join(traceback.format_exception(exc)).rstrip())
            status = 500
            body = {"error": {"message": f"internal error: {type(exc).__name__}: {exc}", "type": "server_error",
                              "param": None, "code": None}}
        text = isinstance(body, str)  # /metrics' exposition, else JSON
        data = body.encode("utf-8") if text else json.dumps(body, ensure_ascii=False).encode("utf-8")
        # counted before the answer goes out: a client holding its answer finds it in /metrics
        # (counted after the write, the last of concurrent requests could be missing from a
        # scrape that its client made once answered)
        app.metrics.request(path, status, time.monotonic() - start)
        try:
            self.send_response(status)
            self.send_header("Content-Type", serve_metrics.CONTENT_TYPE if text else "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 405:
                self.send_header("Allow", _ROUTES[path] + (", HEAD" if _ROUTES[path] == "GET" else ""))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client is gone
            pass
        self._log(app, method, path, status, tokens, "", start, counted=True)

    @staticmethod
    def _log(app: Server, method: str, path: str, status: int, tokens: int, note: str, start: float,
             counted: bool = False) -> None:
        """A request done: counted in /metrics (unless ``counted`` already), and its log line
        (none with --quiet)."""
        seconds = time.monotonic() - start
        if not counted:
            app.metrics.request(path, status, seconds)
        if app.log:
            app.say(f"{method} {path} {status} {tokens} tokens {1000 * seconds:.0f} ms{note}")

    def _route(self, app: Server, method: str, path: str) -> Tuple[Any, int]:
        routes = _ROUTES
        if app.api_key is not None and (path.startswith("/v1/") or path == "/metrics"):
            self._check_key(app.api_key)
        if path not in routes:
            raise HTTPError(404, f"no such path {path!r}; paths: {', '.join(routes)}", code="not_found")
        if method != routes[path] and not (method == "HEAD" and routes[path] == "GET"):
            raise HTTPError(405, f"{path} takes {routes[path]}, not {method}", code="method_not_allowed")
        if path == "/health":
            if app.stopping.is_set():
                raise serve_fields.stopping_error()
            return {"status": "ok"}, 0
        if path == "/v1/models":
            return app.models(), 0
        if path == "/metrics":
            return app.metrics.render(), 0
        if path == "/tokenizer_info":
            return app.tokenizer_info(), 0
        if path in ("/tokenize", "/detokenize"):
            body = self._body()  # open without the key: its errors name no prefix of the server
            known = app.api_key is None or _authorized(self.headers.get("Authorization"), app.api_key)
            return (app.tokenize(body, known) if path == "/tokenize" else app.detokenize(body, known)), 0
        body, chat = self._body(), path == "/v1/chat/completions"
        if isinstance(body, dict) and body.get("stream") is True:
            return None, self._stream(app, app.submit(body, chat), chat)
        return app.complete(body, chat, self._gone, self._start)

    def _check_key(self, key: str) -> None:
        """A /v1/ request carries the API key (401 otherwise, as OpenAI's API answers a bad key)."""
        header = self.headers.get("Authorization")
        if header is None:
            raise HTTPError(401, "no API key: this server needs the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key")
        if not _authorized(header, key):
            raise HTTPError(401, "incorrect API key provided", code="invalid_api_key")

    def _gone(self) -> bool:
        """The client closed its connection (or its sending half: an end of input where nothing more
        is due) or reset it; seen by peeking, nothing read."""
        try:
            return _readable(self.connection) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # reset, or closed
            return True

    def _event(self, pending: List[_Pending]) -> Tuple[int, str, str, Optional[dict]]:
        """The next event of a streamed request; ClientGone (its rows cancelled) once its client
        is gone while it waits."""
        while True:
            try:
                return pending[0].events.get(timeout=_POLL_S)
            except queue.Empty:
                if self._gone():
                    for p in pending:
                        p.cancel()
                    raise ClientGone() from None

    def _stream(self, app: Server, pending: List[_Pending], chat: bool) -> Tuple[int, str]:
        """Answer a streamed request: an error before its batch starts as any other; then
        server-sent events, as OpenAI's API sends them: each piece of text as it comes (of each
        choice, by its index), the rest of a choice's answer and its finish_reason as it ends
        (an error: OpenAI's error object, then [DONE]), then [DONE]. Returns its completion tokens
        and a note for the log (the client gone: its rows are given up). /metrics' time to first
        token: to the first chunk of generated text sent (or of a choice's end: beam search, text
        held back), none for max_tokens 0."""
        index, kind, text, logprobs = self._event(pending)
        if kind == "end" and pending[index].error is not None:
            for p in pending:  # its choices fail alike (one request): none is streamed, none runs
                p.cancel()
            app.metrics.failed(app.name(pending[0]), len(pending))
            raise pending[index].error
        options = pending[0].request.extra.get("stream_options") or {}
        chunks = serve_stream.Chunks(chat, app.name(pending[0]), options.get("include_usage") is True)
        sent, ended, first, reasons = [""] * len(pending), 0, None, [""] * len(pending)
        held = [app.served.holder(p.request) for p in pending]
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(b"".join(chunks.role(i) for i in range(len(pending))))
            while True:
                if kind == "echo":  # the prompt, before the completion's text (not in sent: the answer's)
                    self.wfile.write(chunks.text(text, index, logprobs))
                elif kind == "text":
                    text = held[index](text)  # what may be tool calls waits for the end
                    self.wfile.write(chunks.text(text, index, logprobs) if text or logprobs else b"")
                    sent[index] += text
                    first = self._first(app, first, bool(text or logprobs))
                elif kind == "end":
                    p = pending[index]
                    if p.error is not None:  # as OpenAI's API (and vLLM): an error event, then [DONE]
                        for other in pending:
                            other.cancel()
                        app.metrics.failed(app.name(pending[0]), len(pending))
                        self._count(app)
                        self.wfile.write(serve_stream.event({"error": p.error.error}) + serve_stream.DONE)
                        return 0, f", streamed error {p.error.status}"
                    rest, reasons[index] = self._rest(app, p, sent[index], chunks)
                    self.wfile.write(rest)
                    first = self._first(app, first, not p.asked.score_only)
                    ended += 1
                    if ended == len(pending):
                        break
                index, kind, text, logprobs = self._event(pending)
            usage = app.usage(pending)
            latency = time.monotonic() - self._start
            app.metrics.answered(app.name(pending[0]), usage, reasons, None, per_token(latency, first, pending))
            self._count(app)
            self.wfile.write(chunks.end(usage))
            return usage["completion_tokens"], ", streamed"
        except (OSError, ClientGone):  # the client is gone: its rows stop at the next token, those
            for p in pending:           # waiting are passed over
                p.cancel()
            return 0, ", streamed, client gone"

    def _first(self, app: Server, first: Optional[float], sent: bool) -> Optional[float]:
        """A stream's time to first token: ``first`` if known, else, once ``sent`` (a chunk of
        generated output went out), the seconds since its request was read, observed."""
        if first is None and sent:
            first = time.monotonic() - self._start
            app.metrics.first_token(first)
        return first

    def _count(self, app: Server) -> None:
        """The stream counted in /metrics (a 200: its status went out first) before its last
        event, as an unstreamed answer is before it is sent."""
        app.metrics.request(self.path.split("?", 1)[0], 200, time.monotonic() - self._start)
        self._counted = True

    @staticmethod
    def _rest(app: Server, p: _Pending, sent: str, chunks: serve_stream.Chunks) -> Tuple[bytes, str]:
        """The events that end a choice of a stream: the text not sent yet and the log
        probabilities not sent yet (all of them where they were not streamed: beam search),
        its tool calls (the content left before them), its finish_reason; and that reason."""
        answer, count, reason = p.answer
        logprobs = p.streamed.rest(count) if p.streamed is not None else p.logprobs
        parsed = app.served.tool_calls(p.request, answer)
        if parsed is not None:
            answer, reason = parsed.content or "", parsed.reason
        if not answer.startswith(sent):  # a tokenizer that rewrote text given out as stable
            app.say(f"stream: the text sent {sent!r} is not the start of the answer {answer!r}")
        rest = answer[len(sent):] if answer.startswith(sent) else ""
        calls = chunks.tool_calls(parsed.calls, p.index) if parsed is not None else b""
        text = chunks.text(rest, p.index, logprobs) if rest or logprobs else b""
        return text + calls + chunks.finish(reason, p.index), reason

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise HTTPError(411, "a JSON body with a Content-Length header is needed")
        if int(length) > MAX_BODY:
            raise HTTPError(413, f"the body is {int(length)} bytes, over the {MAX_BODY} this server takes")
        raw = self._read(int(length))
        try:
            obj = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            raise HTTPError(400, f"the body is not JSON: {exc}") from None
        except RecursionError:  # arrays or objects nested thousands deep
            raise HTTPError(400, "the body is not JSON this server reads: it is nested too deeply") from None
        # a lone surrogate ("\ud800" is valid JSON) cannot be tokenized: refused here, as
        # generate refuses it in a request file, not met in the worker
        try:
            jsonl._check_unicode(obj, "the body", ValueError)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        return obj


    def _read(self, length: int) -> bytes:
        """The body's ``length`` bytes, all of them within --request-timeout of its headers
        (else 408: a client sending too little or too slowly holds no thread longer); 400 for a
        connection that ends before them."""
        limit, parts, got = self.server.app.args.request_timeout, [], 0
        deadline = time.monotonic() + limit
        try:
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:  # bytes trickling in, each read in time
                    raise TimeoutError
                self.connection.settimeout(left)
                part = self.rfile.read1(min(length - got, 2 ** 20))
                if not part:
                    raise HTTPError(400, f"the body ended after {got} of its {length} bytes (Content-Length)")
                parts.append(part)
                got += len(part)
        except TimeoutError:
            raise HTTPError(408, f"the body did not come within {limit:g} s (--request-timeout): {got} of its "
                                 f"{length} bytes came", code="request_timeout") from None
        finally:
            self.connection.settimeout(self.timeout)
        return b"".join(parts)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# -- the command -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Run ``serve`` from parsed arguments until a signal; returns the exit code (2 on a user
    error, 128 + the signal's number after a stop)."""
    server = None
    try:
        with StopSignals() as signals:
            server = Server(args)
            host, port = server.address
            names = ", ".join(server.sources) or "none"
            print(f"{_SERVER_LOG}: listening on http://{host}:{port} (model {server.model_id}; prefixes: "
                  f"{names}; {'API key required on /v1/ and /metrics' if server.api_key else 'no API key'}; plain HTTP; "
                  "Ctrl-C stops)", file=sys.stderr, flush=True)
            server.serve_forever(signals)
    except (RequestError, KeyError, ValueError, FileNotFoundError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{_SERVER_LOG}: error: {msg}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        failed = server.close() if server is not None else 0
        answered = f"; {failed} request(s) in flight answered 503" if failed else ""
        print(f"{_SERVER_LOG}: stopped: {signal.Signals(stop.signum).name}{answered}", file=sys.stderr)
        return 128 + stop.signum
    finally:
        if server is not None:
            server.close()
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``prefix-attn serve`` (``argv`` without the subcommand name)."""
    parser = argparse.ArgumentParser(prog="prefix-attn serve", description=__doc__,
                                     formatter_class=cli_args.HelpFormatter)
    cli_parsers.serve_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
