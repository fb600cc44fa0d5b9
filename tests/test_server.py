"""``prefix-attn serve`` (prefix_attn.serve_http): an OpenAI-compatible HTTP server started
in-process on port 0, urllib as its client. Its answers are `prefix-attn generate`'s for the same
requests; concurrent requests share model.generate calls; every error has its status."""
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest
import torch

from prefix_attn import serve, serve_batching, serve_http
from prefix_attn.cli import build_parser

pytestmark = pytest.mark.hf

SYSTEM = "You are terse. "


def save_adapter(folder) -> str:
    """A PEFT adapter of 6 random virtual tokens for the built-in model, saved in ``folder``."""
    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    bank = PrefixBank.attach(tiny.default_model())
    g = torch.Generator().manual_seed(5)
    shape = (bank.num_layers, bank.num_kv_heads, 6, bank.head_dim)
    bank.add("t", 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g))
    bank.save_peft("t", str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return save_adapter(tmp_path_factory.mktemp("adapter"))


@contextmanager
def started(*argv):
    """A server of ``prefix-attn serve ARGV --port 0 --quiet``, answering in a thread."""
    args = build_parser().parse_args(["serve", "--port", "0", "--quiet", *argv])
    server = serve_http.Server(args)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()


def call(server, path, body=None, method=None, raw=None):
    """(status, JSON answer) of ``path``: a POST of ``body`` (or of the bytes ``raw``), else a GET."""
    host, port = server.address
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def generated(tmp_path, requests, *options):
    """`prefix-attn generate`'s results for ``requests`` (dicts) with ``options``."""
    src, out = tmp_path / "r.jsonl", tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="utf-8")
    assert serve.main(["-i", str(src), "-o", str(out), "--no-progress", *options]) == 0
    return [json.loads(line) for line in open(out, encoding="utf-8")]


def answer(status_body, chat=False):
    """(text, num_tokens, finish_reason) of a 200 answer."""
    status, body = status_body
    assert status == 200, body
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    return text, body["usage"]["completion_tokens"], choice["finish_reason"]


# requests mixing prefixes (by "model" or "prefix") and per-request decoding fields
REQUESTS = [
    {"prompt": "hello there"},
    {"prompt": "why?", "prefix": "sys"},
    {"prompt": "", "prefix": "sys"},
    {"prompt": "hi", "prefix": "tenant", "max_tokens": 5},
    {"prompt": "abc", "stop": ["b", "<"], "repetition_penalty": 1.5},
    {"prompt": "the quick brown fox", "prefix": "tenant", "num_beams": 2},
    {"prompt": "1 + 1 =", "do_sample": True, "top_k": 1, "temperature": 0.5, "prefix": "sys"},
]


@pytest.fixture(scope="module")
def server(adapter_dir):
    with started("--prompt-prefix", f"sys={SYSTEM}", "--adapter", f"tenant={adapter_dir}",
                 "--max-new-tokens", "10", "--batch-wait-ms", "0") as s:
        yield s


def test_answers_equal_generate_s(server, adapter_dir, tmp_path):
    """Each answer is generate's for the same request (text, tokens, finish_reason), the
    prefix named by "prefix" or by "model"; an empty prompt after a prompt prefix makes its
    head entry once, not once per request."""
    expected = generated(tmp_path, REQUESTS, "--prompt-prefix", f"sys={SYSTEM}",
                         "--adapter", f"tenant={adapter_dir}", "--max-new-tokens", "10")
    for r, e in zip(REQUESTS, expected):
        got = answer(call(server, "/v1/completions", r))
        assert got == (e["completion"], e["num_tokens"], e["finish_reason"]), r
        if r.get("prefix"):
            as_model = {**{k: v for k, v in r.items() if k != "prefix"}, "model": r["prefix"]}
            assert answer(call(server, "/v1/completions", as_model)) == got
    status, body = call(server, "/v1/completions", {"prompt": "x", "model": "prefix-attn-tiny"})
    assert status == 200 and body["model"] == "prefix-attn-tiny" and body["object"] == "text_completion"
    entries = len(server.served.bank)
    answer(call(server, "/v1/completions", {"prompt": "", "prefix": "sys"}))
    assert len(server.served.bank) == entries


def test_models_and_health(server, adapter_dir):
    status, body = call(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["parent"]) for m in body["data"]] == [
        ("prefix-attn-tiny", None), ("tenant", "prefix-attn-tiny"), ("sys", "prefix-attn-tiny")]
    assert body["data"][1]["root"] == adapter_dir
    assert call(server, "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("body, status, code, words", [
    ({"prompt": "hi", "model": "nope"}, 404, "model_not_found", "The model 'nope' does not exist"),
    ({"prompt": "hi", "prefix": "sy"}, 404, "model_not_found", "did you mean 'sys'"),
    ({"prompt": "hi", "model": "sys", "prefix": "tenant"}, 400, None, "name different prefixes"),
    ({"prompt": "hi", "best_of": 2}, 400, "unsupported", "best_of=2 is not supported"),
    ({"prompt": "hi", "seed": 3, "temperature": 1}, 400, "unsupported", "'seed' is not applied per request"),
    ({"prompt": "hi", "temperature": -1}, 400, None, "'temperature': must be > 0, got -1"),
    ({"prompt": "hi", "temperature": 0, "do_sample": True}, 400, None, "'temperature' 0 is greedy decoding"),
    ({"prompt": "hi", "max_tokens": 1000}, 400, "context_length_exceeded", "longer than the model's 256 positions"),
    ({"prompt": {"a": "b"}}, 400, None, "'prompt' must be a string, an array of strings, an array of token ids or "
                                        "an array of arrays of token ids, got an object"),
    ({"max_tokens": 3}, 400, None, "missing 'prompt'"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, 400, None, "'messages' is not a field"),
    ([1, 2], 400, None, "must be a JSON object"),
])
def test_bad_requests_are_openai_errors(server, body, status, code, words):
    got, answer_body = call(server, "/v1/completions", body)
    error = answer_body["error"]
    assert (got, error["code"]) == (status, code) and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_a_seed_is_taken_where_it_changes_nothing(server):
    """lm-evaluation-harness sends "seed" with greedy requests: taken; a sampled one is refused."""
    status, greedy = call(server, "/v1/completions", {"prompt": "hi", "seed": 7, "max_tokens": 3})
    assert status == 200, greedy
    assert greedy["choices"] == call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})[1]["choices"]
    status, got = call(server, "/v1/completions", {"prompt": "hi", "seed": 7, "do_sample": True})
    assert status == 400 and got["error"]["param"] == "seed" and "not applied per request" in got["error"]["message"]


def test_bad_bodies_paths_and_methods(server):
    assert call(server, "/v1/completions", raw=b"{not json")[0] == 400
    assert call(server, "/v1/completions", raw=b'{"prompt": NaN}')[0] == 400
    assert call(server, "/v1/nothing")[0] == 404
    assert call(server, "/v1/completions")[0] == 405  # a GET
    status, body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and "--chat" in body["error"]["message"]
    assert call(server, "/health")[0] == 200  # still serving


def recording(server):
    """The batch sizes of the model.generate calls the server makes from now on."""
    sizes, generate = [], server.served.model.generate

    def record(input_ids, **kw):
        sizes.append(input_ids.shape[0])
        return generate(input_ids, **kw)
    server.served.model.generate = record
    return sizes


def test_concurrent_requests_share_batches(tmp_path):
    """Requests sent at once (threads) within --batch-wait-ms share model.generate calls by
    their settings, and each gets its own answer (generate's)."""
    requests = [{"prompt": p} for p in ("a", "hello", "the quick brown fox", "xyz", "1 + 1 =")]
    requests += [{"prompt": "hello", "max_tokens": 3}, {"prompt": "abc", "max_tokens": 3}]
    expected = generated(tmp_path, requests, "--max-new-tokens", "6")
    with started("--max-new-tokens", "6", "--batch-wait-ms", "1500") as s:
        sizes = recording(s)
        got = [None] * len(requests)

        def send(i):
            got[i] = answer(call(s, "/v1/completions", requests[i]))
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert got == [(e["completion"], e["num_tokens"], e["finish_reason"]) for e in expected]
    assert sorted(sizes) == [2, 5]  # one call per setting


def test_out_of_memory_alone_is_503_and_the_server_goes_on(server):
    """A batch out of memory is split; the request that still runs out alone is answered 503,
    its batch-mate 200, and the server answers later requests."""
    generate = server.served.model.generate
    sizes = []

    def short_of_memory(input_ids, **kw):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[1] >= 12:  # the long prompt's batch
            raise serve_batching.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return generate(input_ids, **kw)
    server.served.model.generate = short_of_memory
    try:
        ready = [serve_http._Pending(server._requests({"prompt": p}, chat=False)[0])
                 for p in ("a long prompt, long!", "hi")]
        server._answer(ready)
        assert sizes == [2, 1, 1]
        assert ready[0].error.status == 503 and ready[0].error.error["code"] == "out_of_memory"
        assert "ran out of device memory even alone" in ready[0].error.error["message"]
        assert ready[1].answer is not None
        status, body = call(server, "/v1/completions", {"prompt": "a long prompt, long!"})
        assert status == 503 and "lower max_tokens" in body["error"]["message"]
    finally:
        server.served.model.generate = generate
        server._fitting = serve_batching.Fitting()  # the size that fit: not the later tests'
    assert call(server, "/v1/completions", {"prompt": "a long prompt, long!"})[0] == 200


def test_a_later_batch_starts_at_the_size_that_fit(server):
    """Batches of more than 2 rows run out of memory: the first batch of 4 fails once (4 -> 2 + 2);
    a later request's batch of 4 runs as 2 + 2 without failing (serve_batching.Fitting, kept
    across requests); the answers are those of a batch with memory to spare."""
    prompts = [f"request {i} " + "x" * i for i in range(4)]

    def answered():
        ready = [serve_http._Pending(server._requests({"prompt": p}, chat=False)[0]) for p in prompts]
        server._answer(ready)
        return [p.answer for p in ready]
    free = answered()
    generate, sizes = server.served.model.generate, []

    def short_of_memory(input_ids, **kw):
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise serve_batching.OutOfMemoryError("CUDA out of memory (injected)")
        return generate(input_ids, **kw)
    server.served.model.generate = short_of_memory
    try:
        assert answered() == free and sizes == [4, 2, 2]
        assert answered() == free and sizes == [4, 2, 2, 2, 2]  # not 4 again
    finally:
        server.served.model.generate = generate
        server._fitting = serve_batching.Fitting()


def test_an_internal_error_is_500_and_the_server_goes_on(server, capsys):
    generate = server.served.model.generate

    def broken(input_ids, **kw):
        raise RuntimeError("a bug")
    server.served.model.generate = broken
    try:
        status, body = call(server, "/v1/completions", {"prompt": "hi"})
    finally:
        server.served.model.generate = generate
    assert status == 500 and body["error"]["message"] == "internal error: RuntimeError: a bug"
    assert "Traceback" in capsys.readouterr().err
    assert call(server, "/v1/completions", {"prompt": "hi"})[0] == 200


def shut_down_mid_batch(s, send):
    """Shut server ``s`` down while the batch of the request ``send()`` makes generates:
    (send's result, shutdown's, the batch's new tokens)."""
    entered, release, generate = threading.Event(), threading.Event(), s.served.model.generate
    made = []

    def slow(input_ids, **kw):
        entered.set()
        release.wait(60)
        made.append(generate(input_ids, **kw).shape[1] - input_ids.shape[1])
        return input_ids
    s.served.model.generate = slow
    got, failed = [], []
    client = threading.Thread(target=lambda: got.append(send()))
    client.start()
    assert entered.wait(60)
    stopper = threading.Thread(target=lambda: failed.append(s.shutdown()))
    stopper.start()
    while not s.stopping.is_set():
        pass
    release.set()
    client.join()
    stopper.join()
    return got[0], failed[0], made


def test_shutdown_answers_the_request_in_flight_503():
    """A stop while a batch generates ends it at its next token and answers it 503."""
    with started("--max-new-tokens", "200") as s:
        got, failed, made = shut_down_mid_batch(s, lambda: call(s, "/v1/completions", {"prompt": "hi"}))
        assert got[0] == 503 and got[1]["error"]["code"] == "stopping" and failed == 1
        assert made == [1]  # the batch in flight ended at its next token, not after 200


CHATML = ("{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_chat_completions_equal_generate_chat_s(tmp_path):
    from test_serve_chat import _model, chat_tokenizer

    folder = tmp_path / "chat"
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    requests = [{"messages": [{"role": "user", "content": "What is 2+2?"}], "prefix": "terse"},
                {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "And now?"}]}]
    options = ["--model", str(folder), "--chat", "--prompt-prefix", "terse=You are terse.", "--max-new-tokens", "8"]
    expected = generated(tmp_path, requests, *options)
    with started(*options) as s:
        for r, e in zip(requests, expected):
            status, body = call(s, "/v1/chat/completions", r)
            assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
            assert answer((status, body), chat=True) == (e["completion"], e["num_tokens"], e["finish_reason"])
        status, body = call(s, "/v1/completions", {"prompt": "hi"})
        assert status == 400 and "/v1/chat/completions" in body["error"]["message"]


def test_startup_errors_come_before_listening(tmp_path, capsys):
    assert serve_http.main(["--adapter", f"a={tmp_path / 'none'}", "--port", "0"]) == 2
    assert "prefix-attn serve: error:" in capsys.readouterr().err
    assert serve_http.main(["--prompt-prefix", "prefix-attn-tiny=x", "--port", "0"]) == 2
    assert "is the base model's id" in capsys.readouterr().err
    with started() as s:
        host, port = s.address
        assert serve_http.main(["--port", str(port), "--host", host]) == 2
        assert f"cannot listen on {host}:{port}" in capsys.readouterr().err


def test_the_command_says_where_it_listens_and_stops_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "prefix_attn.cli", "serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    try:
        line = proc.stderr.readline()
        assert "prefix-attn serve: listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        with urllib.request.urlopen(url + "/health", timeout=60) as r:
            assert json.load(r) == {"status": "ok"}
        assert "GET /health 200" in proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM
        assert "prefix-attn serve: stopped: SIGTERM" in proc.stderr.read()
    finally:
        proc.kill()
        proc.stderr.close()


def test_a_saved_bank_s_entries_are_served_by_name(tmp_path):
    """--bank DIR (say, the bank a multi-task `prefix-attn train` run writes): each entry is a
    model of /v1/models, and a request naming it gets generate --bank's answer."""
    from prefix_attn import tiny
    from prefix_attn.bank import PrefixBank

    bank = PrefixBank.attach(tiny.default_model())
    g = torch.Generator().manual_seed(7)
    shape = (bank.num_layers, bank.num_kv_heads, 5, bank.head_dim)
    for name in ("legal", "support"):
        bank.add(name, 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g))
    bank.save(str(tmp_path / "bank"))
    requests = [{"prompt": "hello there", "prefix": "legal"}, {"prompt": "hello there", "prefix": "support"}]
    expected = generated(tmp_path, requests, "--bank", str(tmp_path / "bank"))
    with started("--bank", str(tmp_path / "bank")) as server:
        status, models = call(server, "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]][1:] == ["legal", "support"]
        got = [answer(call(server, "/v1/completions", {"model": r["prefix"], "prompt": r["prompt"]}))
               for r in requests]
    assert got == [(e["completion"], e["num_tokens"], e["finish_reason"]) for e in expected]
    assert got[0] != got[1]
