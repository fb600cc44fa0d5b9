"""``prefix-attn serve`` exposed beyond localhost: an API key on /v1/, clients that hang up
before their answer, clients that send too little or too slowly, more connections than served."""
import json
import select
import socket
import struct
import threading
import time
import urllib.request

import pytest

from prefix_attn import serve_http
from prefix_attn.cli import build_parser
from test_server import answer, call, started

pytestmark = pytest.mark.hf


def get(server, path, key=None, body=None):
    """(status, headers, JSON answer) of a GET of ``path`` (a POST of ``body``), with ``key``
    as the Authorization header."""
    host, port = server.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": key} if key is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.load(e)


def raw(server, data: bytes, timeout=10.0, half_close=False) -> bytes:
    """What the server answers to the bytes ``data`` sent on a connection of its own (all it
    sends until it closes; ``half_close``: the sending half closed after them)."""
    with socket.create_connection(server.address, timeout=timeout) as c:
        c.sendall(data)
        if half_close:
            c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            part = c.recv(65536)
            if not part:
                return got
            got += part


def test_an_api_key_guards_v1_and_not_health(capsys):
    """With --api-key, a /v1/ request without 'Authorization: Bearer KEY' (or with another key)
    is a 401 in OpenAI's form (code invalid_api_key); /health stays open; the key is in no log line."""
    key = "s3cret-Key_0"
    server = serve_http.Server(build_parser().parse_args(["serve", "--port", "0", "--api-key", key,
                                                          "--max-new-tokens", "2"]))
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        assert get(server, "/health")[0] == 200
        for sent in (None, "Bearer wrong-guess", f"Basic {key}", key, f"Bearer {key}x", "Bearer "):
            status, headers, body = get(server, "/v1/models", sent)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", sent
            assert body["error"]["type"] == "invalid_request_error" and headers["WWW-Authenticate"] == "Bearer"
        assert get(server, "/v1/nope")[0] == 401
        status, _, body = get(server, "/v1/completions", body={"prompt": "hi"})  # its body unread: still answered
        assert status == 401, body
        assert get(server, "/v1/models", f"Bearer {key}")[0] == 200
        assert get(server, "/v1/models", f"bearer  {key}")[0] == 200
        assert answer(get(server, "/v1/completions", f"Bearer {key}", {"prompt": "hi"})[::2])[1] == 2
    finally:
        server.shutdown()
        thread.join()
    err = capsys.readouterr().err
    assert "GET /v1/models 401" in err and key not in err and "wrong-guess" not in err


def test_the_open_tokenizer_endpoints_name_no_prefix_without_the_key():
    """With --api-key, /tokenize and /detokenize stay open (vLLM's), but a client without the key
    learns no prefix name from them: an unknown "model" is a 404 listing none, as /v1/models
    (guarded) would; with the key, the 404 lists them as elsewhere."""
    server = serve_http.Server(build_parser().parse_args(["serve", "--port", "0", "--quiet", "--api-key", "K",
                                                          "--prompt-prefix", "acme_corp=Be terse."]))
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    try:
        for path, body in (("/tokenize", {"prompt": "x", "model": "acme_cor"}),
                           ("/detokenize", {"tokens": [104], "model": "nope"})):
            status, _, answer_ = get(server, path, body=body)
            assert status == 404 and answer_["error"]["code"] == "model_not_found", answer_
            assert "acme_corp" not in answer_["error"]["message"], answer_
            status, _, answer_ = get(server, path, "Bearer K", body)
            assert status == 404 and "acme_corp" in answer_["error"]["message"], answer_
        assert get(server, "/tokenize", body={"prompt": "x", "model": "acme_corp"})[0] == 200
    finally:
        server.shutdown()
        thread.join()


def test_the_api_key_comes_from_the_environment_unless_given(monkeypatch, capsys):
    monkeypatch.setenv(serve_http.API_KEY_ENV, "from-env")
    assert serve_http.api_key(None) == "from-env"
    assert serve_http.api_key("given") == "given"
    monkeypatch.setenv(serve_http.API_KEY_ENV, "")
    assert serve_http.api_key(None) is None
    assert serve_http.main(["--port", "0", "--api-key", "two words"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-attn serve: error: --api-key: ") and "two words" not in err
    monkeypatch.setenv(serve_http.API_KEY_ENV, "bad\tkey")
    assert serve_http.main(["--port", "0"]) == 2
    assert serve_http.API_KEY_ENV in capsys.readouterr().err


def _request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


@pytest.fixture
def watched():
    """A server whose model.generate calls are recorded (new tokens each; ``begun`` set as one
    begins; ``hold`` cleared: a call waits for it) and whose rows are kept (``rows``)."""
    with started("--max-new-tokens", "200", "--batch-wait-ms", "0", "--batch-size", "1") as s:
        s.made, s.begun, s.hold, generate = [], threading.Event(), threading.Event(), s.served.model.generate
        s.hold.set()
        s.served.stop = []  # no stop id: a row runs to max_tokens unless stopped

        def recorded(input_ids, **kw):
            s.begun.set()
            s.hold.wait(60)
            out = generate(input_ids, **kw)
            s.made.append(out.shape[1] - input_ids.shape[1])
            return out
        s.served.model.generate = recorded
        s.rows, submit = [], s.submit
        s.submit = lambda obj, chat: s.rows.extend(submit(obj, chat)) or s.rows[-1:]
        yield s


def test_a_client_gone_while_its_row_runs_has_it_stopped(watched):
    """A request (not streamed) whose client hangs up while its batch runs: its row stops at its
    next token (it ran to its 200 tokens: the worker busy for them while others waited)."""
    s = watched
    with socket.create_connection(s.address, timeout=10) as c:
        c.sendall(_request({"prompt": "hello", "max_tokens": 200}))
        assert s.begun.wait(30)
    assert s.rows[0].done.wait(10) and s.rows[0].cancelled
    assert answer(call(s, "/v1/completions", {"prompt": "hi", "max_tokens": 3}))[1] == 3
    assert s.made[0] < 100 and s.made[1] == 3


def test_a_client_gone_while_its_request_waits_is_never_run(watched):
    """A request queued behind a batch whose client hangs up: given up at once, never run."""
    s = watched
    s.hold.clear()
    first = threading.Thread(target=lambda: call(s, "/v1/completions", {"prompt": "hi", "max_tokens": 2}))
    first.start()
    try:
        assert s.begun.wait(30)
        with socket.create_connection(s.address, timeout=10) as c:
            c.sendall(_request({"prompt": "hello", "max_tokens": 5}))
            while len(s.rows) < 2:
                time.sleep(0.01)
        assert s.rows[1].done.wait(5) and s.rows[1].cancelled
    finally:
        s.hold.set()
        first.join()
    assert answer(call(s, "/v1/completions", {"prompt": "hi", "max_tokens": 3}))[1] == 3
    assert s.made == [2, 3]


def test_a_streamed_client_gone_has_its_waiting_rows_never_run(watched, monkeypatch):
    """A streamed request of two prompts (a row each, --batch-size 1) whose client hangs up once
    its stream began, seen as a write that fails (not by peeking while it waits): the row
    running stops at its next token, the row waiting is never run (it was run for a token:
    its rows were marked stopped, not given up)."""
    s = watched
    monkeypatch.setattr(serve_http._Handler, "_gone", lambda self: False)
    submit = serve_http.Server.submit.__get__(s)
    s.submit = lambda obj, chat: (lambda rows: s.rows.extend(rows) or rows)(submit(obj, chat))  # every row
    s.hold.clear()
    with socket.create_connection(s.address, timeout=10) as c:
        c.sendall(_request({"prompt": ["hello", "there"], "max_tokens": 200, "stream": True}))
        assert c.recv(100).startswith(b"HTTP/1.0 200")
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # closed with a reset
    s.hold.set()
    assert all(p.done.wait(10) and p.cancelled for p in s.rows)
    assert answer(call(s, "/v1/completions", {"prompt": "hi", "max_tokens": 3}))[1] == 3
    assert len(s.made) == 2 and s.made[0] < 100 and s.made[1] == 3, s.made


@pytest.fixture(scope="module")
def quick():
    with started("--request-timeout", "0.5", "--max-new-tokens", "2", "--max-connections", "3") as s:
        yield s


def test_a_body_that_does_not_all_come_is_408_within_the_request_timeout(quick):
    """A body shorter than its Content-Length held a handler until the socket's 60 s timeout; one
    trickling in held it as long as it trickled. Now: 408 once --request-timeout passes."""
    start = time.monotonic()
    got = raw(quick, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"prompt\"", timeout=5)
    assert got.startswith(b"HTTP/1.0 408") and b'"request_timeout"' in got and b"9 of its 100 bytes" in got
    assert time.monotonic() - start < 3
    with socket.create_connection(quick.address, timeout=5) as c:
        c.sendall(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
        start = time.monotonic()
        for _ in range(100):  # a byte each 50 ms: each read in time, the whole not
            c.sendall(b" ")
            if select.select([c], [], [], 0.05)[0]:
                break
        assert c.recv(1000).startswith(b"HTTP/1.0 408") and time.monotonic() - start < 3


def test_a_body_cut_short_is_400_and_stalled_headers_close_the_connection(quick):
    got = raw(quick, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}", half_close=True)
    assert got.startswith(b"HTTP/1.0 400") and b"ended after 2 of its 100 bytes" in got, got
    start = time.monotonic()
    assert raw(quick, b"GET /health HTTP/1.1\r\nHost", timeout=5) == b""  # closed, nothing said
    assert time.monotonic() - start < 3


def test_connections_beyond_max_connections_are_503_at_once():
    """Every connection was a thread, without a bound: now --max-connections (3 here) are served
    and one more is answered 503 at once; once they close, a new one is served. (Not with the
    0.5 s --request-timeout of ``quick``: an idle connection's handler gave its slot up after it,
    so a test thread late by 0.3 s on a busy machine saw the fourth connection served.)"""
    with started("--max-new-tokens", "2", "--max-connections", "3") as s:
        # accepted in the order they connect: the three idle ones take the slots before the fourth
        idle = [socket.create_connection(s.address, timeout=30) for _ in range(3)]
        try:
            got = raw(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30)
            assert got.startswith(b"HTTP/1.0 503") and b'"too_many_connections"' in got, got
        finally:
            for c in idle:
                c.close()
        deadline = time.monotonic() + 30  # bounds a hang: the handlers see their clients close
        while not raw(s, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.0 200"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
