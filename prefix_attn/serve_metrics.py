"""``GET /metrics`` of ``prefix-attn serve``: its counters, gauges and histograms in Prometheus'
text exposition format (version 0.0.4), written by hand (the standard library only), as vLLM's
and TGI's servers expose theirs.

A :class:`Metrics` is shared by the handler threads and the worker thread: every update and
the rendering hold its lock, so a scrape sees each request counted whole (its count, its
latency) and counts stay exact under concurrent requests. Series:

  prefix_attn_requests_total{endpoint,status}     requests answered, by path (an unknown one:
                                                  "other") and HTTP status (499: the client gone)
  prefix_attn_model_requests_total{model}         completion requests answered 200, by "model"
  prefix_attn_prompt_tokens_total                 their "usage": prompt tokens (each prompt once)
  prefix_attn_generation_tokens_total             their "usage": completion tokens (every choice)
  prefix_attn_model_prompt_tokens_total{model}    the prompt tokens, by "model"
  prefix_attn_model_generation_tokens_total{model}  the completion tokens, by "model"
  prefix_attn_request_success_total{model,finished_reason}  choices ended (vLLM's), by "model"
                                                  and finish_reason: "stop", "length",
                                                  "tool_calls"; "error" for a failed request's
  prefix_attn_time_to_first_token_seconds         histogram: request read to its first token
  prefix_attn_request_time_per_output_token_seconds  histogram: (latency - TTFT) / (tokens - 1)
  prefix_attn_requests_waiting                    rows (choices) queued or gathered, not running
  prefix_attn_requests_running                    rows in the model.generate call running now
  prefix_attn_request_latency_seconds{endpoint}   histogram: request read to answer sent
  prefix_attn_batch_size                          histogram: rows per model.generate call
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Metrics", "CONTENT_TYPE", "LATENCY_BUCKETS", "BATCH_BUCKETS", "TTFT_BUCKETS", "TPOT_BUCKETS",
           "FINISH_REASONS"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FINISH_REASONS = ("stop", "length", "tool_calls", "error")  # each model's shown from 0
_PREFIX = "prefix_attn_"

Labels = Tuple[Tuple[str, str], ...]


def escape(value: str) -> str:
    """A label value as the exposition format quotes it: backslash, double quote, newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: Labels) -> str:
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels) + "}" if labels else ""


def _number(value: float) -> str:
    """A sample's value: an int as such, a float as Python writes it (Prometheus reads both)."""
    if isinstance(value, int):
        return str(value)
    return "+Inf" if value == float("inf") else repr(float(value))


class _Histogram:
    """Observations counted into fixed upper bounds (cumulative when rendered), their sum and count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds, self.counts, self.sum, self.count = tuple(bounds), [0] * len(bounds), 0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: Labels) -> Iterable[str]:
        total = 0
        for bound, count in zip(self.bounds, self.counts):
            total += count
            yield f"{name}_bucket{_labels(labels + (('le', _number(float(bound))),))} {total}"
        yield f"{name}_bucket{_labels(labels + (('le', '+Inf'),))} {self.count}"
        yield f"{name}_sum{_labels(labels)} {_number(self.sum)}"
        yield f"{name}_count{_labels(labels)} {self.count}"


class Metrics:
    """The server's metrics. ``endpoints``: the paths counted by name (any other: "other");
    ``models``: the names a completion's "model" may take, each shown from the start (0);
    ``load()``: (rows waiting, rows running) at the time of a scrape."""

    def __init__(self, endpoints: Iterable[str], models: Iterable[str], load: Callable[[], Tuple[int, int]]):
        self._lock = threading.Lock()
        self._endpoints = set(endpoints)
        self._load = load
        self._requests: Dict[Tuple[str, str], int] = {}
        self._models: Dict[str, int] = {m: 0 for m in models}
        self._prompt_tokens = self._generation_tokens = 0
        self._model_tokens: Dict[str, List[int]] = {m: [0, 0] for m in self._models}  # [prompt, generation]
        self._finished: Dict[Tuple[str, str], int] = {(m, r): 0 for m in self._models for r in FINISH_REASONS}
        self._latency: Dict[str, _Histogram] = {}
        self._batches = _Histogram(BATCH_BUCKETS)
        self._first_token = _Histogram(TTFT_BUCKETS)
        self._per_token = _Histogram(TPOT_BUCKETS)

    def endpoint(self, path: str) -> str:
        """The label of a path: itself if served, else "other" (a client's paths add no series)."""
        return path if path in self._endpoints else "other"

    def request(self, path: str, status: int, seconds: float) -> None:
        """A request answered (or given up: 499) with ``status``, ``seconds`` after it was read."""
        endpoint = self.endpoint(path)
        with self._lock:
            key = (endpoint, str(status))
            self._requests[key] = self._requests.get(key, 0) + 1
            self._latency.setdefault(endpoint, _Histogram(LATENCY_BUCKETS)).observe(seconds)

    def answered(self, model: str, usage: dict, reasons: Iterable[str] = (), first: Optional[float] = None,
                 per_token: Optional[float] = None) -> None:
        """A completion request answered 200 (a stream: ended) for ``model``, with its "usage",
        its choices' finish_reasons, its time to first token (None: none, or observed already
        by :meth:`first_token`) and its seconds per output token (None: under two tokens)."""
        with self._lock:
            if first is not None:
                self._first_token.observe(first)
            self._models[model] = self._models.get(model, 0) + 1
            self._prompt_tokens += usage["prompt_tokens"]
            self._generation_tokens += usage["completion_tokens"]
            tokens = self._model_tokens.setdefault(model, [0, 0])
            tokens[0] += usage["prompt_tokens"]
            tokens[1] += usage["completion_tokens"]
            for reason in reasons:
                self._finish(model, reason, 1)
            if per_token is not None:
                self._per_token.observe(per_token)

    def failed(self, model: str, rows: int) -> None:
        """A completion request for ``model`` answered an error once queued: its ``rows`` choices
        ended, finish_reason "error"."""
        with self._lock:
            self._finish(model, "error", rows)

    def _finish(self, model: str, reason: str, rows: int) -> None:
        key = (model, reason)
        self._finished[key] = self._finished.get(key, 0) + rows

    def first_token(self, seconds: float) -> None:
        """A completion request's first token, ``seconds`` after the request was read."""
        with self._lock:
            self._first_token.observe(seconds)

    def batch(self, rows: int) -> None:
        """A model.generate call of ``rows`` rows."""
        with self._lock:
            self._batches.observe(rows)

    def render(self) -> str:
        """Every series in the text exposition format: HELP and TYPE lines, then its samples."""
        waiting, running = self._load()
        with self._lock:
            out: List[str] = []
            out += _family("requests_total", "counter", "HTTP requests answered, by endpoint and status code",
                           [(f"{_PREFIX}requests_total{_labels((('endpoint', e), ('status', s)))} {n}")
                            for (e, s), n in sorted(self._requests.items())])
            out += _family("model_requests_total", "counter",
                           "completion requests answered 200, by the prefix (\"model\") they named",
                           [f"{_PREFIX}model_requests_total{_labels((('model', m),))} {n}"
                            for m, n in self._models.items()])
            out += _family("prompt_tokens_total", "counter", "prompt tokens of the answered completion requests "
                           "(their usage: each prompt once)", [f"{_PREFIX}prompt_tokens_total {self._prompt_tokens}"])
            out += _family("generation_tokens_total", "counter", "tokens generated for the answered completion "
                           "requests (their usage: every choice)",
                           [f"{_PREFIX}generation_tokens_total {self._generation_tokens}"])
            out += _family("model_prompt_tokens_total", "counter", "prompt tokens of the answered completion "
                           "requests, by \"model\"", [f"{_PREFIX}model_prompt_tokens_total{_labels((('model', m),))} "
                                                       f"{t[0]}" for m, t in self._model_tokens.items()])
            out += _family("model_generation_tokens_total", "counter", "tokens generated for the answered "
                           "completion requests, by \"model\"",
                           [f"{_PREFIX}model_generation_tokens_total{_labels((('model', m),))} {t[1]}"
                            for m, t in self._model_tokens.items()])
            out += _family("request_success_total", "counter", "choices of completion requests ended, by \"model\" "
                           "and finish_reason (\"error\": their request answered an error once queued)",
                           [f"{_PREFIX}request_success_total{_labels((('model', m), ('finished_reason', r)))} {n}"
                            for (m, r), n in self._finished.items()])
            out += _family("requests_waiting", "gauge", "rows (a request's choices) queued or gathered, not running",
                           [f"{_PREFIX}requests_waiting {waiting}"])
            out += _family("requests_running", "gauge", "rows in the model.generate call running now",
                           [f"{_PREFIX}requests_running {running}"])
            out += _family("request_latency_seconds", "histogram",
                           "seconds from a request read to its answer sent (a stream: ended), by endpoint",
                           [line for e, h in sorted(self._latency.items())
                            for line in h.lines(f"{_PREFIX}request_latency_seconds", (("endpoint", e),))])
            out += _family("batch_size", "histogram", "rows per model.generate call",
                           list(self._batches.lines(f"{_PREFIX}batch_size", ())))
            out += _family("time_to_first_token_seconds", "histogram", "seconds from a completion request read to "
                           "its first token (streamed: its first chunk of generated text sent; else: the first "
                           "token of its batch generated)", list(self._first_token.lines(
                               f"{_PREFIX}time_to_first_token_seconds", ())))
            out += _family("request_time_per_output_token_seconds", "histogram", "per answered completion request "
                           "of two or more tokens: (latency - time to first token) / (tokens of its longest "
                           "choice - 1)", list(self._per_token.lines(
                               f"{_PREFIX}request_time_per_output_token_seconds", ())))
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, help: str, samples: List[str]) -> List[str]:
    return [f"# HELP {_PREFIX}{name} {help}", f"# TYPE {_PREFIX}{name} {kind}"] + samples
