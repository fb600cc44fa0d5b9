"""``prefix-attn serve``'s tokenizer endpoints, as vLLM serves them (what lm-evaluation-harness's
``tokenizer_backend=remote`` calls): ``POST /tokenize`` gives the ids the server runs for a prompt
after its prefix, ``POST /detokenize`` their text, ``GET /tokenizer_info`` the special tokens."""
import pytest
from test_server import SYSTEM, call, started

from prefix_attn.serve_inputs import request_of

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def server():
    with started("--prompt-prefix", f"sys={SYSTEM}", "--max-new-tokens", "4", "--batch-wait-ms", "0") as s:
        yield s


def planned(server, fields):
    """The ids the worker runs for a request (its plan), made directly."""
    [job] = server.served.plan([request_of(fields, "request", 1)], "request")
    return job.ids


@pytest.mark.parametrize("prefix", [None, "sys"])
def test_tokenize_gives_the_ids_the_server_runs_after_the_prefix(server, prefix):
    """With no prefix a text's ids start with the start token; after a prompt prefix (which
    carries it) they do not; sent back as a prompt of ids, they get the text's answer."""
    status, got = call(server, "/tokenize", {"prompt": "hé?", "model": prefix})
    assert status == 200, got
    assert got["tokens"] == planned(server, {"prompt": "hé?", "prefix": prefix})
    assert got["tokens"][0] == (1 if prefix is None else ord("h") + 3)  # the byte tokenizer's bos, or "h"
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 256
    by_text = call(server, "/v1/completions", {"prompt": "hé?", "model": prefix})[1]["choices"][0]["text"]
    by_ids = call(server, "/v1/completions", {"prompt": got["tokens"], "model": prefix})[1]["choices"][0]["text"]
    assert by_ids == by_text


def test_tokenize_without_special_tokens_and_an_empty_prompt(server):
    """lm-evaluation-harness's call ("add_special_tokens": false): the text's own ids; an empty
    prompt after a prompt prefix has none of its own (it continues the prefix's)."""
    assert call(server, "/tokenize", {"prompt": "hé", "add_special_tokens": False})[1]["tokens"] == [107, 198, 172]
    assert call(server, "/tokenize", {"prompt": "", "model": "sys"})[1]["tokens"] == []
    assert call(server, "/tokenize", {"prompt": ""})[1]["tokens"] == [1]


def test_tokenize_returns_token_strings_when_asked(server):
    """vLLM's "return_token_strs": each id's token string (the byte tokenizer's bytes as
    SentencePiece's byte tokens, its start token "<s>"); not given unless asked."""
    got = call(server, "/tokenize", {"prompt": "hé", "return_token_strs": True})[1]
    assert got["tokens"] == [1, 107, 198, 172]
    assert got["token_strs"] == ["<s>", "<0x68>", "<0xC3>", "<0xA9>"]
    assert "token_strs" not in call(server, "/tokenize", {"prompt": "hé", "return_token_strs": False})[1]


def test_detokenize_gives_the_text_of_ids(server):
    ids = call(server, "/tokenize", {"prompt": "Café: ok", "add_special_tokens": False})[1]["tokens"]
    assert call(server, "/detokenize", {"tokens": ids}) == (200, {"prompt": "Café: ok"})
    assert call(server, "/detokenize", {"tokens": [], "model": "sys"}) == (200, {"prompt": ""})


def test_tokenizer_info_of_the_byte_tokenizer(server):
    """Its special tokens are ids with no text: null, as lm-eval reads a tokenizer without them."""
    status, got = call(server, "/tokenizer_info")
    assert status == 200
    assert got == {"tokenizer_class": "ByteTokenizer", "model_max_length": 256, "bos_token": None,
                   "eos_token": None, "pad_token": None, "unk_token": None}


@pytest.mark.parametrize("path, body, status, param, words", [
    ("/tokenize", [1], 400, None, "the body must be a JSON object, got list"),
    ("/tokenize", {}, 400, "prompt", "missing 'prompt'"),
    ("/tokenize", {"prompt": 3}, 400, "prompt", "'prompt' must be a string, got a number"),
    ("/tokenize", {"messages": [{"role": "user", "content": "hi"}]}, 400, "messages", "without --chat"),
    ("/tokenize", {"prompt": "a", "add_special_tokens": 1}, 400, "add_special_tokens",
     "'add_special_tokens' must be true or false, got 1"),
    ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model", "The model 'nope' does not exist"),
    ("/tokenize", {"prompt": "a", "return_token_strs": "yes"}, 400, "return_token_strs",
     "'return_token_strs' must be true or false, got \"yes\""),
    ("/detokenize", {}, 400, "tokens", "missing 'tokens'"),
    ("/detokenize", {"tokens": "ab"}, 400, "tokens", "'tokens' must be an array of token ids, got a string"),
    ("/detokenize", {"tokens": [3, 259]}, 400, "tokens", "'tokens'[1]: token id 259 is not in the model's vocabulary"),
    ("/detokenize", {"tokens": [True]}, 400, "tokens", "'tokens'[0] must be a token id (an integer), got true"),
    ("/detokenize", {"tokens": [3], "model": "nope"}, 404, "model", "The model 'nope' does not exist"),
])
def test_tokenizer_endpoint_errors_are_openai_s(server, path, body, status, param, words):
    got = call(server, path, body)
    assert got[0] == status, got
    assert got[1]["error"]["param"] == param and words in got[1]["error"]["message"], got


def test_tokenizer_endpoints_take_their_own_method(server):
    assert call(server, "/tokenize")[0] == 405
    assert call(server, "/tokenizer_info", {})[0] == 405


def test_tokenize_a_conversation_with_chat(tmp_path):
    """With --chat, "messages" are tokenized by the chat template as the server runs them: after
    a prompt prefix, less the system part the prefix holds; "prompt" is chat-less, a 400. The
    info names an HF tokenizer's special tokens and its chat template."""
    from test_serve_chat import CHATML, _model, chat_tokenizer

    folder = tmp_path / "chat"
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    messages = [{"role": "user", "content": "Déjà vu?"}]
    with started("--model", str(folder), "--chat", "--prompt-prefix", "terse=You are terse.") as s:
        got = [call(s, "/tokenize", {"messages": messages, "model": m, "return_token_strs": True})[1]
               for m in (None, "terse")]
        want = [planned(s, {"messages": messages, "prefix": m}) for m in (None, "terse")]
        text = call(s, "/tokenize", {"prompt": "hi"})
        info = call(s, "/tokenizer_info")[1]
        back = call(s, "/detokenize", {"tokens": got[1]["tokens"]})[1]
    assert [g["tokens"] for g in got] == want and len(want[0]) > len(want[1])
    assert got[1]["token_strs"] == s.served.tokenizer.convert_ids_to_tokens(want[1])
    assert "<|im_start|>" in got[1]["token_strs"]
    assert text[0] == 400 and "with --chat" in text[1]["error"]["message"]
    assert (info["eos_token"], info["bos_token"], info["chat_template"]) == ("</s>", "<s>", CHATML)
    assert back["prompt"] == "<|im_start|>user\nDéjà vu?<|im_end|>\n<|im_start|>assistant\n"
