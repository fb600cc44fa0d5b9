"""``prefix-attn serve`` at its edges: bursts of clients, other HTTP methods, request fields
that ask for what is not served."""
import http.client
import json
import socket
import threading

import pytest
import torch

from prefix_attn import serve_batching, serve_http
from prefix_attn.cli import build_parser
from prefix_attn.serve_fields import HTTPError
from test_server import call, started

pytestmark = pytest.mark.hf


def test_a_burst_of_clients_waits_in_the_listen_backlog():
    """20 clients connecting at once while the accept loop is behind (here: not yet running)
    all get their answer; a backlog of 5 (socketserver's) left connections hanging or reset."""
    server = serve_http.Server(build_parser().parse_args(["serve", "--port", "0", "--quiet"]))
    socks = []
    try:
        for _ in range(20):
            s = socket.create_connection(server.address, timeout=3)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(s)
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            assert all(s.recv(100).startswith(b"HTTP/1.0 200") for s in socks)
        finally:
            server.shutdown()
            thread.join()
    finally:
        for s in socks:
            s.close()
        server.close()


@pytest.fixture(scope="module")
def server():
    with started("--max-new-tokens", "4", "--batch-wait-ms", "0") as s:
        yield s


def request(server, method, path):
    conn = http.client.HTTPConnection(*server.address, timeout=30)
    conn.request(method, path)
    r = conn.getresponse()
    return r.status, r.getheader("Content-Type"), r.getheader("Allow"), r.read()


def test_head_is_a_get_without_its_body_and_other_methods_are_405_json(server):
    status, kind, _, body = request(server, "HEAD", "/health")
    assert (status, kind, body) == (200, "application/json", b"")
    for method in ("OPTIONS", "PUT", "DELETE", "PATCH"):
        status, kind, allow, body = request(server, method, "/v1/completions")
        assert (status, kind, allow) == (405, "application/json", "POST"), method
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
    assert request(server, "HEAD", "/v1/completions")[:3] == (405, "application/json", "POST")
    assert request(server, "DELETE", "/v1/models")[2] == "GET, HEAD"
    assert request(server, "OPTIONS", "/nope")[0] == 404


@pytest.mark.parametrize("field, value, status", [
    ("logprobs", None, 200), ("logprobs", False, 200), ("n", 1, 200), ("n", 1.0, 200), ("echo", False, 200),
    ("best_of", 1, 200), ("best_of", 2, 400),
    ("presence_penalty", 0.0, 200), ("presence_penalty", False, 400), ("frequency_penalty", 0, 200),
])
def test_unsupported_fields_are_refused_unless_they_ask_for_nothing(server, field, value, status):
    got, body = call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    assert got == status, body
    if status == 400:
        assert body["error"]["param"] == field and body["error"]["code"] == "unsupported"


@pytest.mark.parametrize("raw, words", [
    (b'{"prompt": "\\ud800"}', "lone surrogate (\\ud800)"),
    (b'{"prompt": "x", "stop": ["\\udc00"]}', "lone surrogate (\\udc00)"),
    (b'{"prompt": "x", "model": "\\ud800"}', "lone surrogate"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
])
def test_bodies_no_request_can_come_from_are_400(server, raw, words):
    status, body = call(server, "/v1/completions", raw=raw)
    assert status == 400 and words in body["error"]["message"], body


def test_a_request_that_fails_its_planning_fails_alone(server, capsys):
    """A bug met while one request is tokenised (in the worker) is a 500 for it alone: the
    requests gathered with it are answered."""
    plan = server.served.plan

    def failing(requests, where):
        if requests[0].prompt == "boom":
            raise RuntimeError("a tokenizer bug")
        return plan(requests, where)
    server.served.plan = failing
    try:
        ready = [serve_http._Pending(server._requests({"prompt": p, "max_tokens": 2}, chat=False)[0])
                 for p in ("hi", "boom", "there")]
        server._answer(ready)
    finally:
        server.served.plan = plan
    assert ready[1].error.status == 500 and "a tokenizer bug" in ready[1].error.error["message"]
    assert ready[0].answer is not None and ready[2].answer is not None
    assert "RuntimeError: a tokenizer bug" in capsys.readouterr().err


def test_openai_s_developer_role_and_text_parts_are_the_system_role_and_a_string(tmp_path):
    """Many OpenAI clients send "content" as text parts and the newer models' "developer" role:
    both were a 400 ('content' must be a string / 'role' must be one of ...); now the same
    answer as "system" and the texts joined with newlines (as vLLM joins them)."""
    from test_serve_chat import CHATML, _model, chat_tokenizer

    folder = tmp_path / "chat"
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    plain = {"messages": [{"role": "system", "content": "Be terse.\nReally."},
                          {"role": "user", "content": "What is 2+2?"}], "max_tokens": 6}
    openai = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be terse."},
                                                             {"type": "text", "text": "Really."}]},
                           {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}],
              "max_tokens": 6}
    with started("--model", str(folder), "--chat") as s:
        status, want = call(s, "/v1/chat/completions", plain)
        assert status == 200, want
        status, got = call(s, "/v1/chat/completions", openai)
        assert status == 200, got
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]


def test_error_messages_speak_of_the_request_not_of_generate_s_file_or_options(server):
    """A 400's message named the server's own count of requests ("request:10: ...") and, for a
    prompt too long, generate's --max-new-tokens / "max_new_tokens" where the client sent
    max_tokens."""
    status, body = call(server, "/v1/completions", {"prompt": "hi", "top_p": 0})
    assert status == 400 and body["error"]["message"] == "1 bad decoding field(s): 'top_p': must be in (0, 1], got 0"
    status, body = call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 1000})
    message = body["error"]["message"]
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "lower max_tokens" in message and "max-new-tokens" not in message and "request:" not in message
    assert message.endswith("positions (shorten the prompt or lower max_tokens): 3 prompt tokens + 0 prefix "
                            "tokens (prefix none) + 1000 new tokens = 1003")


@pytest.mark.parametrize("failure, status", [(RuntimeError("a bug"), 500),
                                             (serve_batching.OutOfMemoryError("CUDA out of memory (injected)"), 503)])
def test_a_row_that_fails_gives_up_its_request_s_other_rows(failure, status):
    """A request of several rows (a prompt array, one row a batch here) whose first row fails (a
    bug in its generate call, or out of memory alone) is answered that row's error, and its rows
    still waiting are passed over: one generate call, not one per row for an answer no one gets."""
    with started("--max-new-tokens", "4", "--batch-wait-ms", "0", "--batch-size", "1") as s:
        generate, calls = s.served.model.generate, []

        def failing(input_ids, **kw):
            calls.append(input_ids.shape[0])
            if len(calls) == 1:
                raise failure
            return generate(input_ids, **kw)
        s.served.model.generate = failing
        try:
            got, body = call(s, "/v1/completions", {"prompt": ["boom", "a", "b", "c"]})
        finally:
            s.served.model.generate = generate
        assert got == status, body
        assert calls == [1]
        assert s._load() == (0, 0)  # none left waiting or running
        assert call(s, "/v1/completions", {"prompt": ["a", "b"]})[0] == 200


def test_a_failed_row_stops_its_request_s_rows_running_at_their_next_token(server):
    """The rows of a request are given up with its error once one fails: a batch running them
    stops them at their next token (the stopping criterion, as for a client gone); another
    request's row in the batch goes on."""
    pending = [serve_http._Pending(r) for r in server._requests({"prompt": ["a", "b"]}, chat=False)]
    for p in pending:
        p.rows = pending  # as Server.submit makes them
    other = serve_http._Pending(server._requests({"prompt": "c"}, chat=False)[0])
    stopping = serve_http._Stopping(threading.Event(), [pending[1], other], per_row=True)
    assert stopping(torch.zeros(2, 1), None).tolist() == [False, False]
    error = HTTPError(503, "out of memory", code="out_of_memory")
    pending[0].resolve(error=error)
    assert pending[1].cancelled and pending[1].done.is_set() and pending[1].error is error
    assert not other.cancelled and stopping(torch.zeros(2, 1), None).tolist() == [True, False]


def _bare_http_server(max_connections: int):
    httpd = serve_http._HTTPServer(("127.0.0.1", 0), serve_http._Handler)
    httpd.slots = threading.BoundedSemaphore(max_connections)
    return httpd


def test_a_stop_signal_while_a_handler_thread_starts_stops_the_server(monkeypatch):
    """SIGTERM handled while the accept loop waits for a handler thread to start (on a busy
    machine that thread may have answered already) reaches serve_forever: it freed the
    connection's slot a second time, and socketserver printed the ValueError and went on
    serving (CI saw `serve` live on 60 s after SIGTERM)."""
    import socketserver

    def started_then_signalled(self, request, client_address):
        self.process_request_thread(request, client_address)  # the thread ran to its end
        raise serve_http.Interrupted(15, "nothing was saved")

    monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request", started_then_signalled)
    monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request_thread", lambda self, request, address: None)
    httpd = _bare_http_server(2)
    try:
        with pytest.raises(serve_http.Interrupted):
            httpd.process_request(None, ("127.0.0.1", 1))
        assert httpd.slots.acquire(blocking=False) and httpd.slots.acquire(blocking=False)
        assert not httpd.slots.acquire(blocking=False)
    finally:
        httpd.server_close()


def test_a_thread_that_cannot_start_frees_its_connection_slot(monkeypatch):
    import socketserver

    def cannot_start(self, request, client_address):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(socketserver.ThreadingMixIn, "process_request", cannot_start)
    httpd = _bare_http_server(1)
    try:
        with pytest.raises(RuntimeError):
            httpd.process_request(None, ("127.0.0.1", 1))
        assert httpd.slots.acquire(blocking=False)
    finally:
        httpd.server_close()


def test_a_stop_signal_whose_raise_was_lost_still_stops_the_accept_loop():
    """A signal handled where its Interrupted is only printed (a __del__, a weakref callback)
    is recorded: the accept loop looks at each turn and stops."""
    from prefix_attn.train_state import StopSignals

    httpd = _bare_http_server(1)
    httpd.stop_signals = StopSignals()
    httpd.stop_signals.received = 15
    raised = []

    def loop():
        try:
            httpd.serve_forever(poll_interval=0.01)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    thread.join(10)
    try:
        assert not thread.is_alive(), "the accept loop went on after the signal"
        assert len(raised) == 1 and isinstance(raised[0], serve_http.Interrupted) and raised[0].signum == 15
    finally:
        if thread.is_alive():
            httpd.shutdown()
            thread.join()
        httpd.server_close()


def test_a_stop_while_the_worker_gathers_a_batch_ends_it_at_once():
    """A stop (shutdown, SIGTERM) while the worker waits --batch-wait-ms for batch-mates of a
    request it took: the worker went on waiting out the whole wait (up to 60 s) before it saw the
    stop, so `serve` outlived a SIGTERM by that long, and close() did not count the request among
    those answered 503."""
    with started("--batch-wait-ms", "30000", "--batch-size", "2") as s:
        [row] = s.submit({"prompt": "hi"}, False)
        while s._queue.qsize():  # taken by the worker, which now waits for a batch-mate
            pass
        stopped = []
        stopper = threading.Thread(target=lambda: stopped.append(s.shutdown()))
        stopper.start()
        stopper.join(10)  # bounds a hang: the stop itself takes a poll or two
        alive = stopper.is_alive()
        stopper.join()
    assert not alive, "the stop waited for --batch-wait-ms"
    assert stopped == [1] and row.done.is_set() and row.error.error["code"] == "stopping"


def test_a_second_ctrl_c_while_the_server_stops_still_answers_the_requests_waiting(monkeypatch):
    """Ctrl-C twice: the second (a KeyboardInterrupt, serve's own handlers being gone by then)
    came while close() waited for the batch in flight to end. The requests in flight and queued
    were never answered, so their handler threads (not daemons) kept `serve` running after its
    "stopped: SIGINT" until their clients gave up."""
    with started("--batch-size", "1", "--batch-wait-ms", "0", "--max-new-tokens", "2") as s:
        entered, release, generate = threading.Event(), threading.Event(), s.served.model.generate

        def held(*args, **kw):
            entered.set()
            release.wait(60)
            return generate(*args, **kw)
        s.served.model.generate = held
        try:
            [running] = s.submit({"prompt": "a"}, False)
            assert entered.wait(60)
            [queued] = s.submit({"prompt": "b"}, False)

            def second_ctrl_c(timeout=None):
                raise KeyboardInterrupt
            monkeypatch.setattr(s._worker, "join", second_ctrl_c)
            s.httpd.shutdown()  # the accept loop ended by the first Ctrl-C, as in run()
            with pytest.raises(KeyboardInterrupt):
                s.close()
            assert [p.error.error["code"] if p.done.is_set() else None for p in (running, queued)] == ["stopping"] * 2
        finally:
            release.set()
            monkeypatch.undo()
            s._worker.join()  # its batch ends at its next token
