"""``prefix-attn serve`` with ``"stream": true`` (prefix_attn.serve_http, serve_stream):
server-sent events parsed by hand, whose pieces of text add up to the answer the same request
gets unstreamed; streamed rows share batches; a client gone mid-stream costs the others nothing."""
import json
import socket
import threading
import urllib.request

import pytest

from prefix_attn import serve_batching, serve_stream, tiny
from test_server import CHATML, SYSTEM, answer, call, recording, shut_down_mid_batch, started

pytestmark = pytest.mark.hf


def events(raw: bytes) -> list:
    """The JSON objects of a server-sent event stream, by hand: ``data: JSON`` events each
    followed by a blank line, the last ``data: [DONE]`` (checked, left out)."""
    text = raw.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    parts = text[:-len("data: [DONE]\n\n")].split("\n\n")
    assert parts[-1] == ""
    assert all(p.startswith("data: ") and "\n" not in p for p in parts[:-1]), parts
    return [json.loads(p[len("data: "):]) for p in parts[:-1]]


def streamed(server, body, path="/v1/completions"):
    """The events of ``body`` streamed (``"stream": true`` added)."""
    host, port = server.address
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        assert (r.status, r.headers["Content-Type"]) == (200, "text/event-stream")
        return events(r.read())


def pieces(chunks, chat=False):
    """(the text pieces, the finish_reason) of a stream's chunks, their format checked."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
    assert all(c["object"] == kind for c in chunks)
    with_choice = [c for c in chunks if c["choices"]]
    choices = [c["choices"][0] for c in with_choice]
    assert all(ch["index"] == 0 for ch in choices)
    assert [ch["finish_reason"] for ch in choices[:-1]] == [None] * (len(choices) - 1)
    if chat:
        assert choices[0]["delta"] == {"role": "assistant", "content": ""} and choices[-1]["delta"] == {}
        texts = [ch["delta"]["content"] for ch in choices[1:-1]]
    else:
        assert choices[-1]["text"] == ""
        texts = [ch["text"] for ch in choices[:-1]]
    assert all(texts), texts  # no empty piece
    return texts, choices[-1]["finish_reason"]


@pytest.fixture(scope="module")
def server():
    with started("--prompt-prefix", f"sys={SYSTEM}", "--max-new-tokens", "24", "--batch-wait-ms", "0") as s:
        yield s


def with_stops(server, body, path="/v1/completions", chat=False):
    """``body``, and ``body`` with a stop text (3 characters, else 2) that its answer holds
    after its start."""
    text = answer(call(server, path, body), chat=chat)[0]
    stop = next(text[i:i + n] for n in (3, 2) for i in range(1, len(text) - n + 1) if "\ufffd" not in text[i:i + n])
    return [body, {**body, "stop": [stop, "never"]}]


def test_streamed_pieces_add_up_to_the_answer(server):
    """With and without stop texts, with a prompt prefix: the pieces (several: sent as they
    come) add up to exactly the unstreamed answer, with its finish_reason."""
    bodies = with_stops(server, {"prompt": "hello there"}) + with_stops(server, {"prompt": "Say:", "model": "sys"})
    for body in bodies:
        text, _, reason = answer(call(server, "/v1/completions", body))
        texts, got_reason = pieces(streamed(server, body))
        assert ("".join(texts), got_reason) == (text, reason), body
        assert len(texts) > 1 or "stop" in body  # sent as they came
    assert [answer(call(server, "/v1/completions", b))[2] for b in bodies] == ["length", "stop"] * 2


def test_usage_chunk_when_asked(server):
    body = {"prompt": "abc", "max_tokens": 5}
    plain = call(server, "/v1/completions", body)[1]
    chunks = streamed(server, {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in streamed(server, body))


def test_beams_are_answered_in_one_piece(server):
    """transformers streams no beam search: a streamed beam request gets its whole answer
    in one piece, when its batch ends."""
    body = {"prompt": "the quick brown fox", "num_beams": 2}
    text, _, reason = answer(call(server, "/v1/completions", body))
    assert pieces(streamed(server, body)) == ([text], reason)


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "hi", "stream": 1}, "stream", "'stream' must be true or false"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
    ({"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}}, "stream_options", "include_usage"),
    ({"prompt": "hi", "stream": True, "max_tokens": 1000}, "prompt", "longer than the model's"),
])
def test_errors_before_the_stream_are_json(server, body, param, words):
    status, got = call(server, "/v1/completions", body)
    assert status == 400 and got["error"]["param"] == param and words in got["error"]["message"], got


def test_streamed_and_unstreamed_requests_share_a_batch():
    requests = [{"prompt": p} for p in ("a", "hello", "xyz", "1 + 1 =")]
    with started("--max-new-tokens", "8") as s:
        alone = [answer(call(s, "/v1/completions", r)) for r in requests]
    with started("--max-new-tokens", "8", "--batch-wait-ms", "1500") as s:
        sizes, got = recording(s), [None] * len(requests)

        def send(i):
            if i % 2:
                got[i] = pieces(streamed(s, requests[i]))
            else:
                got[i] = answer(call(s, "/v1/completions", requests[i]))[::2]
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sizes == [4]
    assert [(g[0] if i % 2 == 0 else "".join(g[0]), g[1]) for i, g in enumerate(got)] == [a[::2] for a in alone]


def test_a_client_gone_mid_stream_drops_its_row_only():
    """A client that reads one event and hangs up: its row stops at once (a row alone: its
    batch ends), a batch-mate gets its whole answer, and the server answers later requests."""
    with started("--max-new-tokens", "120", "--batch-wait-ms", "1000") as s:
        made, generate = [], s.served.model.generate

        def counted(input_ids, **kw):
            out = generate(input_ids, **kw)
            made.append(out.shape[1] - input_ids.shape[1])
            return out
        s.served.model.generate = counted
        submitted, submit = [], s.submit
        s.submit = lambda obj, chat: submitted.extend(submit(obj, chat)) or submitted[-1:]
        whole = answer(call(s, "/v1/completions", {"prompt": "howdy", "max_tokens": 120}))
        host, port = s.address

        def hang_up():
            body = json.dumps({"prompt": "hello", "stream": True}).encode()
            with socket.create_connection((host, port), timeout=60) as c:
                c.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                got = b""
                while b"\n\n" not in got.split(b"\r\n\r\n", 1)[-1]:
                    got += c.recv(1)
                assert got.startswith(b"HTTP/1.0 200") and b"data: {" in got
        got = []
        mate = threading.Thread(target=lambda: got.append(answer(call(s, "/v1/completions", {"prompt": "howdy"}))))
        mate.start()
        hang_up()
        mate.join()
        assert got == [whole]
        gone = [p for p in submitted if p.events is not None]
        assert gone[0].cancelled and gone[0].error.status == 499  # given up: stopped at its next token
        hang_up()  # alone: the batch ends with its row
        s.submit({"prompt": "hi"}, False)[0].done.wait(60)  # queued after it
        gone = [p for p in submitted if p.events is not None]
        assert gone[1].cancelled and made[-2] < 60
        assert answer(call(s, "/v1/completions", {"prompt": "hi"}))[0]


def test_an_error_after_the_stream_began_is_an_error_event():
    """A stop while a streamed batch generates: OpenAI's error object as an event, then [DONE]."""
    with started("--max-new-tokens", "50") as s:
        got, failed, made = shut_down_mid_batch(s, lambda: streamed(s, {"prompt": "hi"}))
    [error] = got
    assert failed == 1 and made == [1]
    assert error["error"]["code"] == "stopping" and set(error["error"]) == {"message", "type", "param", "code"}


def test_out_of_memory_mid_stream_ends_that_stream_and_retries_its_batch_mate():
    """A batch of a streamed row and a plain one runs out of device memory after the stream sent
    text: that text cannot be taken back, so the stream ends with an out_of_memory error event
    (not its text sent twice by a retry); the plain row is retried alone and gets its answer."""
    plain, stream = {"prompt": "hello", "temperature": 0}, {"prompt": "xyz", "temperature": 0}
    with started("--max-new-tokens", "16", "--batch-wait-ms", "1500") as s:
        alone = answer(call(s, "/v1/completions", plain))
        forward, seen = s.served.model.forward, []

        def short_of_memory(*args, **kw):
            rows = (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).shape[0]
            seen.append(rows)
            if rows == 2 and seen.count(2) == 8:  # the prompt's step and 7 tokens of the pair
                raise serve_batching.OutOfMemoryError("CUDA out of memory (injected)")
            return forward(*args, **kw)
        s.served.model.forward = short_of_memory
        got = {}
        try:
            threads = [threading.Thread(target=lambda: got.update(stream=streamed(s, stream))),
                       threading.Thread(target=lambda: got.update(plain=answer(call(s, "/v1/completions", plain))))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            s.served.model.forward = forward
    assert seen.count(2) == 8 and 1 in seen[seen.index(2):]  # the pair failed, a row ran alone after
    assert got["plain"] == alone
    *chunks, error = got["stream"]
    assert any(c["choices"] and c["choices"][0]["text"] for c in chunks)  # text went out first
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks if c["choices"])
    assert error["error"]["code"] == "out_of_memory", error
    assert "its stream begun" in error["error"]["message"]


def test_chat_stream_adds_up_to_the_chat_answer(tmp_path):
    from test_serve_chat import _model, chat_tokenizer

    folder = tmp_path / "chat"
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    with started("--model", str(folder), "--chat", "--prompt-prefix", "terse=You are terse.",
                 "--max-new-tokens", "16") as s:
        body = {"messages": [{"role": "user", "content": "What is 2+2?"}], "model": "terse"}
        for b in with_stops(s, body, "/v1/chat/completions", chat=True):
            text, _, reason = answer(call(s, "/v1/chat/completions", b), chat=True)
            texts, got_reason = pieces(streamed(s, b, "/v1/chat/completions"), chat=True)
            assert ("".join(texts), got_reason) == (text, reason)


def row_pieces(tokens, stops=()):
    """What :class:`serve_stream.RowText` gives out token by token, and the row."""
    tok = tiny.ByteTokenizer()
    row = serve_stream.RowText(tok, [tok.eos_token_id], tok.pad_token_id, list(stops))
    return [row.add(t) for t in tokens], row


def test_a_pad_token_within_the_answer_streams_as_finish_keeps_it():
    """A pad token the model generates before other tokens is part of the answer (finish keeps
    it: its text where special tokens are kept, for a tool-call parser): the streamed text is
    that answer's, not one without it (the handler said "the text sent ... is not the start of
    the answer" and the rest was lost); trailing pads (generate's filler) are left out."""
    from prefix_attn.serve_stop import finish
    from test_serve_chat import chat_tokenizer

    tok = chat_tokenizer()
    ids = tok.encode("ab", add_special_tokens=False) + [tok.pad_token_id] + tok.encode("cd", add_special_tokens=False)
    for special in (True, False):
        row = serve_stream.RowText(tok, [tok.eos_token_id], tok.pad_token_id, [], special)
        sent = "".join(row.add(t) for t in ids + [tok.eos_token_id, tok.pad_token_id, tok.pad_token_id])
        text, count, reason = finish(tok, row.new, [tok.eos_token_id], tok.pad_token_id, [], special)
        assert (text, count, reason) == ("ab<pad>cd" if special else "abcd", 5, "stop")
        assert sent == text[:-1]  # the last token's text goes out as the answer ends (_rest)


def test_row_text_holds_back_unfinished_characters_and_stop_starts():
    """A character's bytes are held until all came, a token's text until the next token came
    (it might merge), a tail that may start a stop text until it cannot; a stop id ends the row,
    and what finish gives for the row's tokens goes on from what was given out."""
    from prefix_attn.serve_stop import finish

    tok = tiny.ByteTokenizer()
    out, row = row_pieces(tok.encode("a€b", add_special_tokens=False) + [tok.eos_token_id, 0, 7])
    assert out == ["", "a", "", "", "€", "", "", ""] and row.done
    assert finish(tok, row.new, [tok.eos_token_id], 0, []) == ("a€b", 5, "stop")
    out, row = row_pieces(tok.encode("xa-yab!", add_special_tokens=False), stops=["ab"])
    assert out == ["", "x", "", "a-", "y", "", ""] and row.done
    assert finish(tok, row.new, [tok.eos_token_id], 0, ["ab"])[0] == "xa-y"


class _WordPieces:
    """A tokenizer as SentencePiece decodes: token i is a word start (" w<i>") or a piece
    ("<i>"), the whole text's first space dropped; with ``tidy``, " ." becomes "." across tokens
    (transformers' clean_up_tokenization_spaces)."""

    eos_token_id, pad_token_id = 0, None

    def __init__(self, tidy=False):
        self.tidy, self.calls = tidy, []

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        text = "".join(" ." if i % 7 == 0 else f" w{i}" if i % 3 == 0 else f"{i}" for i in ids)
        text = text[1:] if text.startswith(" ") else text
        return text.replace(" .", ".") if self.tidy else text


@pytest.mark.parametrize("tokenizer", ["bytes", "words", "tidy"])
def test_row_text_decodes_a_window_and_stays_exact_over_long_rows(tokenizer):
    """RowText decoded the row's whole text at every token (4 rows of 2048 tokens, BPE: 3.0 s,
    0.28 s anchored); now the tokens past an anchor, the whole text once every 64 tokens, checked
    against it. The pieces still add up to finish's text: bytes of characters split across tokens,
    SentencePiece's dropped first space, and a decoding that tidies across tokens (the row then
    decodes whole)."""
    from prefix_attn.serve_stop import finish

    if tokenizer == "bytes":
        tok = tiny.ByteTokenizer()
        ids = tok.encode("naïve €uro ünïcode 東京 " * 40, add_special_tokens=False)
        calls = []
        real = tok.decode
        tok.decode = lambda ids, **kw: calls.append(len(ids)) or real(ids, **kw)
    else:
        tok = _WordPieces(tidy=tokenizer == "tidy")
        ids = [1 + (n * 5) % 40 for n in range(900)]
        calls = tok.calls
    row = serve_stream.RowText(tok, [tok.eos_token_id], None, ["zz"])
    sent = "".join(row.add(t) for t in ids)
    final = finish(tok, row.new, [tok.eos_token_id], None, ["zz"])[0]
    # the server sends the rest of finish's text at the end: the last token's, held back
    assert final == tok.decode(ids) and final.startswith(sent) and len(final) - len(sent) <= 4
    whole = [n for n in calls if n > 2 * serve_stream.RowText.ANCHOR_EVERY + 1]
    assert row.anchored and len(whole) <= len(ids) // serve_stream.RowText.ANCHOR_EVERY + 2


class _Thirds(_WordPieces):
    """A decoding that is no concatenation: a "!" ends the text of a multiple of 3 tokens."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode(ids) + ("" if len(ids) % 3 else "!")


def test_row_text_decodes_whole_once_the_anchored_text_is_not_the_whole_one():
    tok = _Thirds()
    row = serve_stream.RowText(tok, [tok.eos_token_id], None, [])
    ids = [1 + (n * 5) % 40 for n in range(3 * serve_stream.RowText.ANCHOR_EVERY)]
    for t in ids:
        row.add(t)
    assert not row.anchored and row._text() == tok.decode(ids)
