"""``prefix-attn serve``'s "logprobs", "echo" (with max_tokens 0: the prompt scored alone, as
lm-evaluation-harness asks) and "n": checked against the served model itself, a forward of
prompt + completion after the same prefix."""
import threading

import pytest
import torch
from test_server import SYSTEM, adapter_dir, call, generated, started  # noqa: F401 (a fixture)
from test_server_stream import streamed, with_stops

from prefix_attn import tiny
from prefix_attn.serve_inputs import request_of

pytestmark = pytest.mark.hf

BYTES = tiny.ByteTokenizer()


@pytest.fixture(scope="module")
def server():
    with started("--prompt-prefix", f"sys={SYSTEM}", "--max-new-tokens", "6", "--batch-wait-ms", "0") as s:
        yield s


def reference(server, prompt, prefix, max_new_tokens=5):
    """(prompt ids, greedy new ids, log_softmax [tokens, vocab] of prompt + new) of the served
    model for a request, computed directly."""
    served = server.served
    [job] = served.plan([request_of({"prompt": prompt, "prefix": prefix}, "request", 1)], "request")
    with torch.no_grad():
        out = served.model.generate(torch.tensor([job.ids]), prefixes=[job.prefix], max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=served.pad_id, eos_token_id=served.stop)
        lp = torch.log_softmax(served.model(out, prefixes=[job.prefix]).logits.float(), -1)[0]
    return job.ids, out[0, len(job.ids):].tolist(), lp


def chosen(lp, ids, start):
    """The log probabilities of ``ids[start:]`` under ``lp`` (row i predicts ids[i + 1])."""
    return [lp[i - 1, ids[i]].item() for i in range(start, len(ids))]


def test_greedy_logprobs_are_the_models_after_the_prefix(server):
    ids, new, lp = reference(server, "why?", "sys")
    status, body = call(server, "/v1/completions", {"prompt": "why?", "model": "sys", "logprobs": 2, "max_tokens": 5})
    assert status == 200, body
    got = body["choices"][0]["logprobs"]
    assert body["usage"]["completion_tokens"] == len(new) == len(got["tokens"]) == 5
    torch.testing.assert_close(got["token_logprobs"], chosen(lp, ids + new, len(ids)), rtol=0, atol=1e-5)
    for token, value, top in zip(got["tokens"], got["token_logprobs"], got["top_logprobs"]):
        assert len(top) == 2 and top[token] == value == max(top.values())  # greedy: the top token
    assert got["text_offset"] == list(range(5))  # one byte a token
    plain = call(server, "/v1/completions", {"prompt": "why?", "logprobs": 0, "max_tokens": 5})[1]
    assert plain["choices"][0]["logprobs"]["token_logprobs"] != got["token_logprobs"]  # the prefix counts
    assert len(plain["choices"][0]["logprobs"]["top_logprobs"][0]) == 1  # 0 top tokens: the chosen one


def test_echo_with_max_tokens_0_scores_the_prompt_in_one_forward(server):
    """lm-evaluation-harness's loglikelihood request: no generate call, the prompt's tokens
    scored after the prefix (the first one: null), requests of a batch in one forward."""
    ids, _, lp = reference(server, "2 + 2 = 4", "sys", max_new_tokens=1)
    calls = []
    model, generate = server.served.model, server.served.model.generate
    model.generate = lambda *a, **k: calls.append("generate") or generate(*a, **k)
    hook = model.register_forward_hook(lambda *_: calls.append("forward"))
    try:
        body = {"prompt": "2 + 2 = 4", "model": "sys", "echo": True, "max_tokens": 0, "logprobs": 1, "temperature": 0}
        status, got = call(server, "/v1/completions", body)
    finally:
        model.generate = generate
        hook.remove()
    assert status == 200, got
    assert calls == ["forward"]
    [choice] = got["choices"]
    assert choice["text"] == "2 + 2 = 4" and choice["finish_reason"] == "length"
    assert got["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == "2 + 2 = 4" and logprobs["text_offset"] == list(range(9))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    torch.testing.assert_close(logprobs["token_logprobs"][1:], chosen(lp, ids, 1), rtol=0, atol=1e-5)
    plain = call(server, "/v1/completions", {**body, "model": None})[1]["choices"][0]["logprobs"]
    assert plain["token_logprobs"][2:] != logprobs["token_logprobs"][1:]  # [BOS, '2', ...] without a prefix


def test_echo_with_tokens_gives_the_prompt_then_the_completion(server):
    ids, new, lp = reference(server, "abc", None, max_new_tokens=3)
    status, body = call(server, "/v1/completions", {"prompt": "abc", "echo": True, "logprobs": 1, "max_tokens": 3})
    assert status == 200, body
    [choice] = body["choices"]
    plain = call(server, "/v1/completions", {"prompt": "abc", "max_tokens": 3})[1]["choices"][0]
    assert choice["text"] == "abc" + plain["text"]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(ids) + 3 and logprobs["text_offset"][:4] == [0, 0, 1, 2]  # BOS: ""
    torch.testing.assert_close(logprobs["token_logprobs"][1:], chosen(lp, ids + new, 1), rtol=0, atol=1e-5)
    status, body = call(server, "/v1/completions", {"prompt": "abc", "echo": True, "max_tokens": 2})
    assert body["choices"][0]["text"].startswith("abc") and body["choices"][0]["logprobs"] is None


def test_n_choices_greedy_are_equal_and_counted_once_each(server):
    status, body = call(server, "/v1/completions", {"prompt": "hi", "n": 3, "max_tokens": 4, "logprobs": 1})
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({(c["text"], str(c["logprobs"])) for c in body["choices"]}) == 1
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["prompt_tokens"] == 3  # BOS h i


def test_n_sampled_choices_are_generate_s_rows_of_one_batch(tmp_path):
    """n = 3 sampled: the three rows generate samples for the request three times in a batch."""
    request = {"prompt": "hi", "temperature": 1.0}
    expected = generated(tmp_path, [request] * 3, "--max-new-tokens", "8")
    with started("--max-new-tokens", "8", "--batch-wait-ms", "500") as s:
        status, body = call(s, "/v1/completions", {**request, "n": 3})
    assert status == 200, body
    assert [c["text"] for c in body["choices"]] == [e["completion"] for e in expected]
    assert len({c["text"] for c in body["choices"]}) == 3


def test_n_streams_each_choice_by_its_index(server):
    whole = call(server, "/v1/completions", {"prompt": "yo", "max_tokens": 5})[1]["choices"][0]
    chunks = streamed(server, {"prompt": "yo", "max_tokens": 5, "n": 2, "stream_options": {"include_usage": True}})
    texts, reasons = {0: "", 1: ""}, {}
    for c in chunks[:-1]:
        [choice] = c["choices"]
        texts[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            reasons[choice["index"]] = choice["finish_reason"]
    assert texts == {0: whole["text"], 1: whole["text"]} and reasons == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 10


def streamed_logprobs(chunks, chat=False):
    """(the text, the "logprobs" entries of every chunk concatenated) of a streamed choice, each
    chunk's entries but the last's checked to be of tokens whose text is sent by then
    (completions: each token's text_offset within the text sent so far; the last chunk's may
    hold a stop text's tokens, whose text is not sent)."""
    text, merged, ahead = "", {"content": []} if chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                            "text_offset": []}, []
    for c in chunks:
        for choice in c["choices"]:
            text += choice["delta"].get("content") or "" if chat else choice["text"]
            if choice["logprobs"] is not None:
                for key, values in choice["logprobs"].items():
                    merged[key] += values
                ahead.append(any(offset > len(text) for offset in choice["logprobs"].get("text_offset", [])))
    assert not any(ahead[:-1])
    return text, merged


def assert_same_logprobs(got, want):
    """Equal tokens and offsets; log probabilities within float tolerance (a step's logits after
    the KV cache against one forward of the whole text)."""
    if "content" in got:
        got, want = got["content"], want["content"]
        assert [(c["token"], c["bytes"]) for c in got] == [(c["token"], c["bytes"]) for c in want]
        pairs = [(c["logprob"], w["logprob"]) for c, w in zip(got, want)]
        tops = [({t["token"]: t["logprob"] for t in c["top_logprobs"]}, {t["token"]: t["logprob"] for t in w["top_logprobs"]})
                for c, w in zip(got, want)]
    else:
        assert (got["tokens"], got["text_offset"]) == (want["tokens"], want["text_offset"])
        pairs, tops = list(zip(got["token_logprobs"], want["token_logprobs"])), list(zip(got["top_logprobs"], want["top_logprobs"]))
    assert pairs and tops
    assert [a is None for a, _ in pairs] == [b is None for _, b in pairs]  # an echo's first prompt token
    pairs = [(a, b) for a, b in pairs if a is not None]
    torch.testing.assert_close([a for a, _ in pairs], [b for _, b in pairs], rtol=0, atol=1e-5)
    for a, b in tops:
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert a.keys() == b.keys()
        torch.testing.assert_close([a[k] for k in b], list(b.values()), rtol=0, atol=1e-5)


@pytest.mark.parametrize("body", [
    {"prompt": "why?", "model": "sys", "logprobs": 2},
    {"prompt": "hi", "logprobs": 0, "max_tokens": 12},
    {"prompt": "hi", "logprobs": 5, "repetition_penalty": 1.5, "max_tokens": 12},  # before the penalty
    {"prompt": "hi", "logprobs": 1, "max_tokens": 12, "stop": ["ZZ", "\u00e9"]},  # the random model writes ZZ
    {"prompt": "[1, 2", "logprobs": 3, "n": 2, "max_tokens": 12},
    {"prompt": "hi", "logprobs": 2, "num_beams": 2},  # beams do not stream: all of them at the end
])
def test_streamed_logprobs_are_the_unstreamed_ones(server, body):
    """Each chunk carries the entries of its tokens (text_offset counted across chunks); joined,
    they are the request's unstreamed "logprobs", choice by choice."""
    whole = call(server, "/v1/completions", body)[1]["choices"]
    chunks = streamed(server, body)
    for choice in whole:
        text, merged = streamed_logprobs([{**c, "choices": [ch for ch in c["choices"] if ch["index"] == choice["index"]]}
                                          for c in chunks])
        assert text == choice["text"]
        assert_same_logprobs(merged, choice["logprobs"])


@pytest.fixture(scope="module")
def prefixed(adapter_dir):
    with started("--prompt-prefix", f"sys={SYSTEM}", "--adapter", f"tenant={adapter_dir}", "--max-new-tokens", "8",
                 "--batch-wait-ms", "0") as s:
        yield s


def echo_bodies(server):
    """Streamed echoes to check: prefixes (a prompt prefix, an adapter, its head entry), n = 2, prompt
    arrays, token ids, characters of several bytes, logprobs none, 0 and 3, a stop text, beams,
    max_tokens 0."""
    ids = [BYTES.encode(t, add_special_tokens=False) for t in ("Ça ", "x€y")]
    stop = with_stops(server, {"prompt": "hello", "model": "tenant", "max_tokens": 8})[1]["stop"]
    bodies = [
        {"prompt": "Déjà vu €", "model": "sys", "logprobs": 3, "n": 2},
        {"prompt": ["naïve", "ab"], "model": "tenant", "logprobs": 0},
        {"prompt": ids, "model": "tenant", "logprobs": 3, "n": 2},
        {"prompt": ids[1], "logprobs": 3},
        {"prompt": "hello", "model": "tenant", "logprobs": 3, "stop": stop},
        {"prompt": "hello", "model": "tenant", "stop": stop, "n": 2},
        {"prompt": ["é!ü", "x"], "model": "sys", "max_tokens": 0, "logprobs": 3, "n": 2},
        {"prompt": "ünï", "max_tokens": 0},
        {"prompt": "", "model": "sys", "logprobs": 1},  # the prompt prefix's head entry: no prompt entries
        {"prompt": "hi €", "logprobs": 2, "num_beams": 2},  # beams: the completion's entries at the end
    ]
    return [{**b, "echo": True} for b in bodies]


def test_a_streamed_echo_is_the_unstreamed_one(prefixed):
    """"echo" with "stream": true (vLLM's, OpenAI's legacy completions): each choice's first chunk
    is its prompt's text with, where asked, its tokens' entries (the first one null); then the
    completion as streamed. Joined, each choice is the unstreamed answer's: its text exactly,
    text_offset exactly (the completion's after the prompt), the log probabilities within float
    rounding, its finish_reason; max_tokens 0: the prompt's chunk, then the finish chunk."""
    reasons = set()
    for body in echo_bodies(prefixed):
        status, whole = call(prefixed, "/v1/completions", body)
        assert status == 200, (body, whole)
        chunks = streamed(prefixed, body)
        prompts = [prefixed.served.tokenizer.decode(p) if isinstance(p, list) else p
                   for p in ([body["prompt"]] if isinstance(body["prompt"], str) or isinstance(body["prompt"][0], int)
                             else body["prompt"])]
        for choice in whole["choices"]:
            own = [ch for c in chunks for ch in c["choices"] if ch["index"] == choice["index"]]
            prompt = prompts[choice["index"] // body.get("n", 1)]
            echoed = prompt != "" or "model" not in body  # not the head entry: its prompt's entries
            first = prompt != "" or (echoed and body.get("logprobs") is not None)  # the echo's chunk
            assert choice["text"].startswith(prompt), body
            if first:
                assert own[0]["text"] == prompt and own[0]["finish_reason"] is None, (body, own[0])
            if body.get("max_tokens") == 0:
                assert len(own) == 1 + first and own[-1]["text"] == ""
            assert own[-1]["finish_reason"] == choice["finish_reason"], body
            reasons.add(choice["finish_reason"])
            text, merged = streamed_logprobs([{"choices": [ch]} for ch in own])
            assert text == choice["text"], body
            if body.get("logprobs") is None:
                assert choice["logprobs"] is None and all(ch["logprobs"] is None for ch in own)
                continue
            assert_same_logprobs(merged, choice["logprobs"])
            assert (merged["token_logprobs"][0] is None) == echoed and merged["text_offset"] == sorted(merged["text_offset"])
    assert reasons == {"stop", "length"}


def test_equal_rows_are_scored_once(prefixed):
    """The choices of one prompt ("n") and equal prompts of an array share one row of the scoring
    forward (streamed echo, and the unstreamed logprobs of greedy choices, equal); each choice
    still gets the whole entries."""
    model = prefixed.served.model
    forward, rows = model.forward, []

    def counted(input_ids=None, **kw):
        rows.append(input_ids.shape[0])
        return forward(input_ids=input_ids, **kw)
    body = {"prompt": ["Déjà vu", "ab", "Déjà vu"], "model": "sys", "logprobs": 2, "n": 3, "echo": True,
            "max_tokens": 0}
    greedy = {"prompt": "hi", "n": 3, "logprobs": 1, "max_tokens": 4}
    model.forward = counted
    try:
        chunks = streamed(prefixed, body)
        # 9 choices of 2 prompts, in batches of 8 and 1 (--batch-size): 2 rows scored, then 1 (8, 1 before)
        assert rows == [2, 1], rows
        rows.clear()
        whole = call(prefixed, "/v1/completions", greedy)[1]
        assert rows[0] == 3 and rows[-1] == 1, rows  # generated as 3 rows, scored as 1
    finally:
        del model.forward
    assert [c["logprobs"] for c in whole["choices"]] == [whole["choices"][0]["logprobs"]] * 3
    echoes = {}
    for c in chunks:
        for ch in c["choices"]:
            if ch["logprobs"] is not None and ch["text"]:
                echoes[ch["index"]] = (ch["text"], ch["logprobs"])
    assert sorted(echoes) == list(range(9))
    assert all(echoes[i] == echoes[0] for i in (1, 2, 6, 7, 8)) and echoes[3][0] == "ab"
    for choice in call(prefixed, "/v1/completions", body)[1]["choices"]:
        assert_same_logprobs(echoes[choice["index"]][1], choice["logprobs"])


def test_streamed_logprobs_with_a_byte_level_tokenizer(byte_level_folder):
    """Tokens holding part of a character ("bytes:\\xNN", their text sent once it is whole):
    the streamed entries and offsets are the unstreamed ones, completions and chat alike."""
    body = {"prompt": "Déjà vu, ", "logprobs": 3, "max_tokens": 16}
    messages = {"messages": [{"role": "user", "content": "Ça va?"}], "logprobs": True, "top_logprobs": 2,
                "max_tokens": 16}
    with started("--model", byte_level_folder) as s:
        whole = call(s, "/v1/completions", body)[1]["choices"][0]
        text, merged = streamed_logprobs(streamed(s, body))
    assert text == whole["text"]
    assert_same_logprobs(merged, whole["logprobs"])
    with started("--model", byte_level_folder, "--chat") as s:
        whole = call(s, "/v1/chat/completions", messages)[1]["choices"][0]
        text, merged = streamed_logprobs(streamed(s, messages, "/v1/chat/completions"), chat=True)
    assert text == whole["message"]["content"]
    assert_same_logprobs(merged, whole["logprobs"])


def test_concurrent_scoring_requests_share_a_forward(tmp_path):
    with started("--max-new-tokens", "4", "--batch-wait-ms", "300") as s:
        rows = []
        hook = s.served.model.register_forward_hook(lambda m, args, out: rows.append(out.logits.shape[0]))
        got = []
        bodies = [{"prompt": p, "echo": True, "max_tokens": 0, "logprobs": 1} for p in ("a", "bcd", "ef")]
        threads = [threading.Thread(target=lambda b=b: got.append(call(s, "/v1/completions", b))) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        hook.remove()
    assert sorted(len(b["choices"][0]["logprobs"]["tokens"]) for _, b in got) == [2, 3, 4]
    assert rows == [3]


def test_chat_logprobs_are_openai_s_content_entries(tmp_path):
    from test_serve_chat import CHATML, _model, chat_tokenizer

    folder = tmp_path / "chat"
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    body = {"messages": [{"role": "user", "content": "What is 2+2?"}], "model": "terse", "logprobs": True,
            "top_logprobs": 3, "max_tokens": 4}
    with started("--model", str(folder), "--chat", "--prompt-prefix", "terse=You are terse.") as s:
        status, got = call(s, "/v1/chat/completions", body)
        plain = call(s, "/v1/chat/completions", {**body, "logprobs": False, "top_logprobs": None})[1]
        bad = call(s, "/v1/chat/completions", {**body, "logprobs": False})
        echo = call(s, "/v1/chat/completions", {**body, "echo": True})
        [job] = s.served.plan([request_of({"messages": body["messages"], "prefix": "terse"}, "request", 1)], "r")
        with torch.no_grad():
            out = s.served.model.generate(torch.tensor([job.ids]), prefixes=[job.prefix], max_new_tokens=4,
                                          do_sample=False, pad_token_id=s.served.pad_id)
            lp = torch.log_softmax(s.served.model(out, prefixes=[job.prefix]).logits.float(), -1)[0]
    assert status == 200, got
    content = got["choices"][0]["logprobs"]["content"]
    assert plain["choices"][0]["logprobs"] is None
    assert "".join(c["token"] for c in content if not c["token"].startswith("bytes:")) == \
        content_text(got).replace("\ufffd", "")  # the random model's bytes may not make characters
    assert all(set(c) == {"token", "logprob", "bytes", "top_logprobs"} and len(c["top_logprobs"]) == 3 and
               c["top_logprobs"][0] == {k: c[k] for k in ("token", "logprob", "bytes")} for c in content)
    # OpenAI's promise: the entries' bytes joined are the content's (a token may hold part of a character)
    assert bytes(b for c in content for b in c["bytes"]).decode("utf-8", "replace") == content_text(got)
    assert all(c["bytes"] == list(c["token"].encode()) for c in content if not c["token"].startswith("bytes:"))
    torch.testing.assert_close([c["logprob"] for c in content], chosen(lp, out[0].tolist(), len(job.ids)),
                               rtol=0, atol=1e-5)
    assert bad[0] == 400 and "'top_logprobs' needs 'logprobs': true" in bad[1]["error"]["message"]
    assert echo[0] == 400 and echo[1]["error"]["param"] == "echo"


def content_text(answer: dict) -> str:
    return answer["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def byte_level_folder(tmp_path_factory):
    """A tiny Llama saved with a byte-level BPE tokenizer (GPT-2's scheme: a character outside
    ASCII is several tokens)."""
    from test_serve_chat import CHATML, _model, chat_tokenizer

    folder = tmp_path_factory.mktemp("byte_level")
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    return str(folder)


def test_a_byte_level_token_holding_part_of_a_character_is_its_bytes(byte_level_folder):
    """Completions: "bytes:\\xNN" for each token of "é" (c3 a9), its own byte, not U+FFFD's."""
    with started("--model", byte_level_folder) as s:
        status, got = call(s, "/v1/completions", {"prompt": "é!", "echo": True, "logprobs": 1, "max_tokens": 0})
    assert status == 200, got
    logprobs = got["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["bytes:\\xc3", "bytes:\\xa9", "!"]
    assert logprobs["text_offset"] == [0, 0, 1]  # "é" begins where its first byte does
    assert all("\ufffd" not in t for top in logprobs["top_logprobs"][1:] for t in top)


def test_chat_bytes_of_partial_tokens_join_into_the_content(byte_level_folder):
    """Chat: an answer whose characters span tokens ("é", "中") gives each token's own bytes
    (OpenAI's "bytes"), and the "token" "bytes:\\xNN"; joined, they are the content's UTF-8."""
    answer = "é中!"
    with started("--model", byte_level_folder, "--chat") as s:
        tok, model = s.served.tokenizer, s.served.model
        forced = torch.tensor(tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id])
        model.generate = lambda ids, **kwargs: torch.cat([ids, forced.expand(len(ids), -1)], dim=1)
        status, got = call(s, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                       "logprobs": True, "top_logprobs": 2})
    assert status == 200, got
    content = got["choices"][0]["logprobs"]["content"]
    assert content_text(got) == answer
    assert [c["bytes"] for c in content] == [[0xc3], [0xa9], [0xe4], [0xb8], [0xad], [0x21]]
    assert [c["token"] for c in content] == ["bytes:\\xc3", "bytes:\\xa9", "bytes:\\xe4", "bytes:\\xb8",
                                             "bytes:\\xad", "!"]
    assert bytes(b for c in content for b in c["bytes"]).decode() == answer
    assert all(len(e["bytes"]) == 1 or not e["token"].startswith("bytes:") for c in content for e in c["top_logprobs"])


@pytest.mark.parametrize("body, param, words", [
    ({"logprobs": 6}, "logprobs", "'logprobs' must be an integer from 0 to 5, got 6"),
    ({"logprobs": True}, "logprobs", "'logprobs' must be an integer from 0 to 5, got true"),
    ({"n": 9}, "n", "'n' must be an integer from 1 to 8 (this server's --batch-size), got 9"),
    ({"n": 0}, "n", "'n' must be an integer from 1 to 8"),
    ({"n": True}, "n", "'n' must be an integer"),
    ({"n": 2.5}, "n", "'n' must be an integer"),
    ({"echo": 0}, "echo", "'echo' must be true or false"),
    ({"top_logprobs": 2}, "top_logprobs", "'top_logprobs' is chat's"),
    ({"best_of": 2}, "best_of", "best_of=2 is not supported"),
    ({"max_tokens": 0}, None, "'max_tokens': must be at least 1"),  # 0 only with echo
])
def test_what_cannot_be_served_is_400(server, body, param, words):
    status, got = call(server, "/v1/completions", {"prompt": "hi", **body})
    assert status == 400 and words in got["error"]["message"], got
    assert got["error"]["param"] == param


def test_a_pad_token_the_model_generates_is_scored_where_it_came(tmp_path):
    """A row's pad token is left out only at its end (generate's filler after a row stopped):
    one the model generates mid-answer (this chat tokenizer's <pad> is no stop id) stays, so
    the tokens scored are those generated, each after the ones before it."""
    from test_serve_chat import CHATML, _model, chat_tokenizer

    folder = tmp_path / "chat"
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    messages = [{"role": "user", "content": "Give me the JSON."}, {"role": "assistant", "content": "Sure: "}]
    body = {"messages": messages, "continue_final_message": True, "model": "terse", "logprobs": True,
            "max_tokens": 5}
    with started("--model", str(folder), "--chat", "--prompt-prefix", "terse=You are terse.") as s:
        status, got = call(s, "/v1/chat/completions", body)
        served = s.served
        [job] = served.plan([request_of({**body, "prefix": "terse", "model": None}, "request", 1)], "r")
        with torch.no_grad():
            out = served.model.generate(torch.tensor([job.ids]), prefixes=[job.prefix], max_new_tokens=5,
                                        do_sample=False, pad_token_id=served.pad_id, eos_token_id=served.stop)
            lp = torch.log_softmax(served.model(out, prefixes=[job.prefix]).logits.float(), -1)[0]
    new = out[0, len(job.ids):].tolist()
    assert served.pad_id in new[:-1] and not set(new) & set(served.stop), new  # a pad generated mid-answer
    assert status == 200, got
    content = got["choices"][0]["logprobs"]["content"]
    assert got["usage"]["completion_tokens"] == len(content) == len(new)
    torch.testing.assert_close([c["logprob"] for c in content], chosen(lp, out[0].tolist(), len(job.ids)),
                               rtol=0, atol=1e-5)


def test_text_offsets_of_characters_split_over_tokens_point_into_the_text(server):
    """A character whose bytes take several tokens: each token's offset is where its text
    begins in "text" (the characters completed before it), never past the text's end. Adding
    up each token's text decoded alone (one U+FFFD a byte) put "!" at 2 in "é!ü" (it is at 1)
    and the last byte at 4, past the end."""
    body = {"prompt": "é!ü", "echo": True, "max_tokens": 0, "logprobs": 0}
    status, got = call(server, "/v1/completions", body)
    assert status == 200, got
    [choice] = got["choices"]
    assert choice["text"] == "é!ü"
    # BOS, é's two bytes, "!", ü's two bytes: a token of a character's second byte starts
    # after no more text than its first
    assert choice["logprobs"]["text_offset"] == [0, 0, 0, 1, 2, 2]
    status, got = call(server, "/v1/completions", {"prompt": "é", "echo": True, "max_tokens": 4, "logprobs": 0})
    offsets, text = got["choices"][0]["logprobs"]["text_offset"], got["choices"][0]["text"]
    assert offsets[:3] == [0, 0, 0] and offsets[3] == 1 and all(0 <= o <= len(text) for o in offsets)
