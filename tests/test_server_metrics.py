"""``GET /metrics`` of ``prefix-attn serve`` (prefix_attn.serve_metrics): Prometheus' text
exposition, parsed here by hand; its counts exact after known requests (completions, a 404, a
streamed one, n=2), under concurrent ones, its gauges while a batch runs, its histograms
consistent; guarded by --api-key as /v1/ is."""
import re
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from prefix_attn import serve_metrics
from test_server import SYSTEM, call, recording, started
from test_server_stream import streamed
from test_tool_calls import QUESTION, TOOLS, forced, qwen  # noqa: F401 (qwen: a fixture)

pytestmark = pytest.mark.hf

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse(text: str) -> dict:
    """{(name, ((label, value), ...)): value} of an exposition, checked line by line: each
    sample after its family's HELP and TYPE lines, each label value's escapes undone."""
    assert text.endswith("\n")
    samples, types = {}, {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram") and name not in types, line
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types and (family == name or types[family] == "histogram"), line
        pairs = _LABEL.findall(labels or "")
        assert "".join(f'{k}="{v}",' for k, v in pairs)[:-1] == (labels or ""), line
        unescaped = tuple((k, re.sub(r"\\(.)", lambda m: "\n" if m[1] == "n" else m[1], v)) for k, v in pairs)
        key = (name, unescaped)
        assert key not in samples, line
        samples[key] = float(value)
    return samples


def scrape(server, headers=None):
    """(status, Content-Type, parsed samples or None) of GET /metrics."""
    host, port = server.address
    req = urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["Content-Type"], parse(r.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], None


def series(samples, name):
    """{labels as a dict's sorted items: value} of one metric's samples."""
    return {labels: value for (n, labels), value in samples.items() if n == name}


def requests_total(samples):
    return {(dict(k)["endpoint"], dict(k)["status"]): v
            for k, v in series(samples, "prefix_attn_requests_total").items()}


def check_histogram(samples, name, labels=()):
    """Its buckets cumulative, bounded by +Inf = _count; returns (bounds -> count, sum, count)."""
    buckets = {dict(k)["le"]: v for k, v in series(samples, name + "_bucket").items()
               if tuple(p for p in k if p[0] != "le") == labels}
    bounds = sorted(buckets, key=float)
    assert bounds[-1] == "+Inf"
    counts = [buckets[b] for b in bounds]
    assert counts == sorted(counts), counts
    count, total = samples[(name + "_count", labels)], samples[(name + "_sum", labels)]
    assert counts[-1] == count
    return buckets, total, count


@pytest.fixture(scope="module")
def server():
    with started("--prompt-prefix", f"sys={SYSTEM}", "--max-new-tokens", "5", "--batch-wait-ms", "0") as s:
        yield s


def test_exposition_parses_and_counts_are_exact(server):
    """After a plain completion, one with n=2, a streamed one, an unknown "model" (404), an
    unknown path (404, endpoint "other") and /health: every count is exactly theirs; tokens are
    the sum of their usage; batch sizes those of the model.generate calls."""
    status, kind, before = scrape(server)
    assert (status, kind) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert series(before, "prefix_attn_model_requests_total") == {(("model", "prefix-attn-tiny"),): 0,
                                                                  (("model", "sys"),): 0}
    sizes = recording(server)
    usages = [call(server, "/v1/completions", {"prompt": "hello", "model": "sys"})[1]["usage"],
              call(server, "/v1/completions", {"prompt": "abc", "n": 2, "max_tokens": 3})[1]["usage"]]
    chunks = streamed(server, {"prompt": "the fox", "model": "sys", "stream_options": {"include_usage": True}})
    usages.append(chunks[-1]["usage"])
    assert call(server, "/v1/completions", {"prompt": "hi", "model": "nope"})[0] == 404
    assert call(server, "/nope")[0] == 404
    assert call(server, "/health")[0] == 200
    _, _, after = scrape(server)
    assert requests_total(after) == {("/metrics", "200"): 1, ("/v1/completions", "200"): 3,
                                     ("/v1/completions", "404"): 1, ("other", "404"): 1, ("/health", "200"): 1}
    assert series(after, "prefix_attn_model_requests_total") == {(("model", "prefix-attn-tiny"),): 1,
                                                                 (("model", "sys"),): 2}
    assert usages[1]["completion_tokens"] == 6  # n=2: each choice's 3 tokens
    assert after[("prefix_attn_prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
    assert after[("prefix_attn_generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
    assert after[("prefix_attn_requests_waiting", ())] == after[("prefix_attn_requests_running", ())] == 0
    buckets, total, count = check_histogram(after, "prefix_attn_batch_size")
    assert sorted(sizes) == [1, 1, 2] and (total, count) == (sum(sizes), len(sizes))
    assert (buckets["1.0"], buckets["2.0"]) == (2, 3)
    assert requests_total(before) == {}  # the server's first request: counted once answered
    for endpoint in ("/v1/completions", "other", "/health", "/metrics"):
        labels = (("endpoint", endpoint),)
        _, total, count = check_histogram(after, "prefix_attn_request_latency_seconds", labels)
        assert count == sum(n for (e, _), n in requests_total(after).items() if e == endpoint) and total > 0
    _, _, again = scrape(server)
    assert requests_total(again)[("/metrics", "200")] == 2


def test_concurrent_requests_keep_counts_exact(server):
    """24 threads each sending a completion and a /health while others scrape: every request
    counted once, the tokens their usage's sum, each scrape's latency counts equal its requests'."""
    _, _, before = scrape(server)
    usages, scraped, lock = [], [], threading.Lock()

    def send(i):
        usage = call(server, "/v1/completions", {"prompt": "x" * (i % 5 + 1), "max_tokens": 2})[1]["usage"]
        call(server, "/health")
        with lock:
            usages.append(usage)

    def watch():
        for _ in range(5):
            scraped.append(scrape(server)[2])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(24)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, _, after = scrape(server)
    got, was = requests_total(after), requests_total(before)
    assert got[("/v1/completions", "200")] - was[("/v1/completions", "200")] == 24
    assert got[("/health", "200")] - was[("/health", "200")] == 24
    for name, field in (("prompt", "prompt_tokens"), ("generation", "completion_tokens")):
        key = (f"prefix_attn_{name}_tokens_total", ())
        assert after[key] - before[key] == sum(u[field] for u in usages)
    for samples in scraped + [after]:
        for (endpoint, _), _n in requests_total(samples).items():
            labels = (("endpoint", endpoint),)
            count = check_histogram(samples, "prefix_attn_request_latency_seconds", labels)[2]
            assert count == sum(n for (e, _), n in requests_total(samples).items() if e == endpoint)


def test_gauges_count_rows_waiting_and_running():
    """With --batch-size 1 and model.generate held: one row running, the two queued behind it
    waiting; none of either once they are answered."""
    with started("--max-new-tokens", "2", "--batch-size", "1", "--batch-wait-ms", "0") as s:
        release, generate = threading.Event(), s.served.model.generate

        def held(*args, **kw):
            release.wait(60)
            return generate(*args, **kw)
        s.served.model.generate = held
        threads = [threading.Thread(target=call, args=(s, "/v1/completions", {"prompt": p})) for p in "abc"]
        for t in threads:
            t.start()
        deadline, load = time.monotonic() + 30, None
        while time.monotonic() < deadline and load != (2, 1):
            _, _, samples = scrape(s)
            load = (samples[("prefix_attn_requests_waiting", ())], samples[("prefix_attn_requests_running", ())])
            time.sleep(0.05)
        release.set()
        for t in threads:
            t.join()
        assert load == (2, 1)
        _, _, samples = scrape(s)
        assert (samples[("prefix_attn_requests_waiting", ())], samples[("prefix_attn_requests_running", ())]) == (0, 0)
        assert series(samples, "prefix_attn_model_requests_total") == {(("model", "prefix-attn-tiny"),): 3}


def test_metrics_need_the_api_key_where_one_is_set():
    """--api-key guards /metrics as it guards /v1/ (its series name the prefixes); /health stays open."""
    with started("--api-key", "k3y", "--prompt-prefix", f"sys={SYSTEM}") as s:
        assert scrape(s)[0] == 401
        assert scrape(s, {"Authorization": "Bearer wrong"})[0] == 401
        status, _, samples = scrape(s, {"Authorization": "Bearer k3y"})
        assert status == 200 and requests_total(samples) == {("/metrics", "401"): 2}
        assert call(s, "/health")[0] == 200


def test_label_values_are_escaped():
    """A label value's backslash, double quote and newline are escaped, as the format reads them."""
    assert serve_metrics.escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    metrics = serve_metrics.Metrics(["/x"], ['we"ird\\name\n'], lambda: (0, 0))
    samples = parse(metrics.render())
    assert series(samples, "prefix_attn_model_requests_total") == {(("model", 'we"ird\\name\n'),): 0}


def test_updates_from_many_threads_are_not_lost():
    """8 threads counting at once, thread switches forced often: no update lost, and each
    scrape taken meanwhile sees every request whole (its count and its latency together)."""
    interval = sys.getswitchinterval()
    metrics = serve_metrics.Metrics(["/x"], ["m"], lambda: (0, 0))
    scraped = []

    def count():
        for _ in range(5000):
            metrics.request("/x", 200, 0.001)
            metrics.answered("m", {"prompt_tokens": 2, "completion_tokens": 3})

    threads = [threading.Thread(target=count) for _ in range(8)]
    sys.setswitchinterval(1e-6)
    try:
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            scraped.append(parse(metrics.render()))
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    samples = parse(metrics.render())
    assert requests_total(samples) == {("/x", "200"): 40000}
    assert samples[("prefix_attn_model_requests_total", (("model", "m"),))] == 40000
    assert (samples[("prefix_attn_prompt_tokens_total", ())], samples[("prefix_attn_generation_tokens_total", ())]) \
        == (80000, 120000)
    for s in scraped:
        if requests_total(s):
            latency = check_histogram(s, "prefix_attn_request_latency_seconds", (("endpoint", "/x"),))
            assert latency[2] == requests_total(s)[("/x", "200")]


def test_a_stream_is_counted_before_its_last_event(server, monkeypatch):
    """As an unstreamed answer is counted before it is sent, a stream is counted (its request,
    its tokens, by model too, its finish_reason) before its usage chunk and [DONE] go out: a
    client that read [DONE] finds it in /metrics. Counted after the last write, a scrape right
    after could miss it."""
    from prefix_attn import serve_stream

    seen, end = [], serve_stream.Chunks.end

    def checked_end(self, usage):
        samples = parse(server.metrics.render())
        seen.append((requests_total(samples).get(("/v1/completions", "200"), 0),
                     samples[("prefix_attn_generation_tokens_total", ())],
                     samples[("prefix_attn_model_generation_tokens_total", (("model", "prefix-attn-tiny"),))],
                     sum(series(samples, "prefix_attn_request_success_total").values())))
        return end(self, usage)

    _, _, before = scrape(server)
    monkeypatch.setattr(serve_stream.Chunks, "end", checked_end)
    chunks = streamed(server, {"prompt": "the fox", "stream_options": {"include_usage": True}})
    was = requests_total(before).get(("/v1/completions", "200"), 0)
    tokens = chunks[-1]["usage"]["completion_tokens"]
    by_model = before[("prefix_attn_model_generation_tokens_total", (("model", "prefix-attn-tiny"),))]
    ended = sum(series(before, "prefix_attn_request_success_total").values())
    total = before[("prefix_attn_generation_tokens_total", ())]
    assert seen == [(was + 1, total + tokens, by_model + tokens, ended + 1)]
    _, _, after = scrape(server)
    assert requests_total(after)[("/v1/completions", "200")] == was + 1  # once, not again at the end


WEIRD = 'q"uo\\te\nx'  # a prefix name the exposition must escape: quote, backslash, newline


def test_tokens_and_finish_reasons_by_model():
    """Per "model" (a prefix whose name needs escaping, another, the base model): prompt and
    generation tokens are its answers' usage added up, request_success_total{finished_reason}
    counts its choices' finish_reasons ("error": each choice of a request that failed once
    queued, here a prompt too long, unstreamed and streamed); every series shown from 0."""
    with started("--prompt-prefix", f"sys={SYSTEM}", "--prompt-prefix", f"{WEIRD}={SYSTEM}",
                 "--max-new-tokens", "5", "--batch-wait-ms", "0") as s:
        _, _, before = scrape(s)
        models = ("prefix-attn-tiny", "sys", WEIRD)
        for name in ("prefix_attn_model_prompt_tokens_total", "prefix_attn_model_generation_tokens_total"):
            assert series(before, name) == {(("model", m),): 0 for m in models}
        assert set(series(before, "prefix_attn_request_success_total").values()) == {0}
        first = call(s, "/v1/completions", {"prompt": "hello", "model": "sys"})[1]
        stop = first["choices"][0]["text"][1:3]  # greedy: the same text again, cut there
        answers = [("sys", first),
                   ("sys", call(s, "/v1/completions", {"prompt": "hello", "model": "sys", "stop": [stop]})[1]),
                   (WEIRD, call(s, "/v1/completions", {"prompt": "abc", "model": WEIRD, "n": 2, "max_tokens": 3})[1]),
                   ("prefix-attn-tiny", call(s, "/v1/completions", {"prompt": "a longer prompt"})[1])]
        chunks = streamed(s, {"prompt": "the fox", "model": WEIRD, "max_tokens": 4,
                              "stream_options": {"include_usage": True}})
        for stream in (False, True):  # queued, then refused: too long for the model's positions
            too_long = {"prompt": "hi", "model": "sys", "max_tokens": 1000, "stream": stream}
            assert call(s, "/v1/completions", too_long)[0] == 400
        _, _, after = scrape(s)
    reasons = {m: {} for m in models}
    usage = {m: [0, 0] for m in models}
    for model, answer in answers + [(WEIRD, {"usage": chunks[-1]["usage"],
                                             "choices": [c["choices"][0] for c in chunks if c["choices"]]})]:
        usage[model][0] += answer["usage"]["prompt_tokens"]
        usage[model][1] += answer["usage"]["completion_tokens"]
        for choice in answer["choices"]:
            if choice["finish_reason"] is not None:
                reasons[model][choice["finish_reason"]] = reasons[model].get(choice["finish_reason"], 0) + 1
    reasons["sys"]["error"] = 2
    assert reasons["sys"] == {"length": 1, "stop": 1, "error": 2} and reasons[WEIRD] == {"length": 3}
    assert usage[WEIRD][1] == 2 * 3 + 4 and answers[1][1]["choices"][0]["text"] == first["choices"][0]["text"][:1]
    for m in models:
        assert after[("prefix_attn_model_prompt_tokens_total", (("model", m),))] == usage[m][0]
        assert after[("prefix_attn_model_generation_tokens_total", (("model", m),))] == usage[m][1]
    got = {(dict(k)["model"], dict(k)["finished_reason"]): v
           for k, v in series(after, "prefix_attn_request_success_total").items()}
    assert got == {(m, r): reasons[m].get(r, 0) for m in models for r in ("stop", "length", "tool_calls", "error")}


def test_time_to_first_token_and_per_output_token():
    """With 0.3 s before each model.generate call and 0.1 s per forward (a token each): an
    unstreamed request's time to first token is its batch's first token (at least 0.4 s, at
    most what the client waited); a streamed one's is its first text chunk's, well before its
    end; time per output token, (latency - TTFT) / (tokens - 1), at least 0.1 s; a request
    that generates nothing (max_tokens 0) observes neither."""
    def timings(server):
        samples = scrape(server)[2]
        return [check_histogram(samples, f"prefix_attn_{name}_seconds")[1:]
                for name in ("time_to_first_token", "request_time_per_output_token")]

    with started("--max-new-tokens", "6", "--batch-wait-ms", "0") as s:
        model = s.served.model
        generate, forward = model.generate, model.forward

        def slow_generate(*args, **kw):
            time.sleep(0.3)
            return generate(*args, **kw)

        def slow_forward(*args, **kw):
            time.sleep(0.1)
            return forward(*args, **kw)
        model.generate, model.forward = slow_generate, slow_forward
        zero = timings(s)
        assert zero == [(0, 0), (0, 0)]
        sent = time.monotonic()
        tokens = call(s, "/v1/completions", {"prompt": "abc"})[1]["usage"]["completion_tokens"]
        waited = time.monotonic() - sent
        (ttft, n), (tpot, m) = timings(s)
        assert tokens == 6 and (n, m) == (1, 1)
        assert 0.4 <= ttft <= waited and 0.1 <= tpot <= (waited - 0.4) / 5
        sent = time.monotonic()
        chunks = streamed(s, {"prompt": "abc", "stream_options": {"include_usage": True}})
        waited = time.monotonic() - sent
        (streamed_ttft, n), (streamed_tpot, m) = timings(s)
        assert chunks[-1]["usage"]["completion_tokens"] == 6 and (n, m) == (2, 2)
        assert 0.4 <= streamed_ttft - ttft <= waited - 0.3  # 3 or more tokens after the first chunk
        assert 0.4 / 5 <= streamed_tpot - tpot  # its first chunk may wait for a second token's text
        assert call(s, "/v1/completions", {"prompt": "abc", "max_tokens": 0, "echo": True})[0] == 200
        streamed(s, {"prompt": "abc", "max_tokens": 0, "echo": True})
        assert timings(s) == [(streamed_ttft, 2), (streamed_tpot, 2)]


def test_a_stream_failing_midway_counts_its_choices_as_errors():
    """A streamed n=2 request whose batch fails after its text began (a bug in the third forward):
    its error event goes out, and each of its choices counts finish_reason "error" (none other)."""
    with started("--max-new-tokens", "6", "--batch-wait-ms", "0") as s:
        model, calls = s.served.model, []
        forward = model.forward

        def failing(*args, **kw):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a bug")
            return forward(*args, **kw)
        model.forward = failing
        chunks = streamed(s, {"prompt": "abc", "n": 2})
        _, _, samples = scrape(s)
    assert chunks[-1]["error"]["type"] == "server_error" and any(c.get("choices") for c in chunks[:-1])
    got = {dict(k)["finished_reason"]: v for k, v in series(samples, "prefix_attn_request_success_total").items()}
    assert got == {"stop": 0, "length": 0, "tool_calls": 0, "error": 2}


def test_tool_calls_count_as_their_finish_reason(qwen):  # noqa: F811
    """--chat --tool-call-parser hermes, the model made to answer a call: an answer parsed into
    tool_calls, unstreamed and streamed, counts finish_reason "tool_calls"; one without tools "stop"."""
    with started("--model", qwen, "--chat", "--tool-call-parser", "hermes", "--max-new-tokens", "80",
                 "--batch-wait-ms", "0") as s:
        forced(s.served.model, s.served.tokenizer)
        asked = {"messages": QUESTION, "tools": TOOLS}
        assert call(s, "/v1/chat/completions", asked)[1]["choices"][0]["finish_reason"] == "tool_calls"
        assert streamed(s, asked, "/v1/chat/completions")[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert call(s, "/v1/chat/completions", {"messages": QUESTION})[1]["choices"][0]["finish_reason"] == "stop"
        _, _, samples = scrape(s)
    got = {dict(k)["finished_reason"]: v for k, v in series(samples, "prefix_attn_request_success_total").items()}
    assert got == {"stop": 1, "length": 0, "tool_calls": 2, "error": 0}
