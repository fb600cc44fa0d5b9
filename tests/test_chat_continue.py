"""``"continue_final_message"`` and ``"add_generation_prompt"`` (prefix_attn.chat, vLLM's request
fields) under ``generate --chat`` and ``serve --chat``: a request whose messages end with an
assistant message (the start of the answer) is answered by continuing it. Its tokens are
``apply_chat_template(..., continue_final_message=True)``'s, the answer is only the
continuation, and every way to ask for it wrongly is one clear error naming the line."""
import json

import pytest
import torch

from prefix_attn import serve
from prefix_attn.chat import ChatTemplate
from prefix_attn.serve import read_requests
from prefix_attn.serve_inputs import RequestError
from prefix_attn.serve_stop import finish
from test_serve_chat import CHATML, _model, chat_tokenizer, record_generate
from test_server import answer, call, started
from test_server_stream import pieces, streamed

pytestmark = pytest.mark.hf

TERSE = "You are terse."
ASK = {"role": "user", "content": "Give me the JSON."}
PREFILL = {"role": "assistant", "content": 'Sure, here it is: {"a": '}
CONTINUE = {"messages": [ASK, PREFILL], "continue_final_message": True}
# a request of each form: no prefix, after a prompt prefix, vLLM's both fields, a longer conversation
REQUESTS = [
    {"id": "c", **CONTINUE},
    {"id": "p", "prefix": "terse", **CONTINUE},
    {"id": "v", **CONTINUE, "add_generation_prompt": False},
    {"id": "m", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Now "}],
     "continue_final_message": True},
    {"id": "n", "messages": [ASK]},  # a new turn, for contrast
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("continue") / "chatml"
    _model().save_pretrained(str(root))
    chat_tokenizer(CHATML).save_pretrained(str(root))
    return root


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return str(path)


def _conversation(r):
    return ([{"role": "system", "content": TERSE}] if r.get("prefix") else []) + r["messages"]


def _full_ids(tok, r):
    """The transformers rendering of the whole conversation, as the request asks for it."""
    cont = bool(r.get("continue_final_message"))
    return tok.apply_chat_template(_conversation(r), add_generation_prompt=not cont, continue_final_message=cont,
                                   tokenize=True, return_dict=False)


def _generate(tmp_path, folder, requests, *options):
    out = tmp_path / "answers.jsonl"
    rc = serve.main(["-i", _write(tmp_path / "requests.jsonl", requests), "-o", str(out), "--model", str(folder),
                     "--chat", "--prompt-prefix", f"terse={TERSE}", "--max-new-tokens", "8", "--no-progress",
                     *options])
    return rc, ([json.loads(line) for line in open(out, encoding="utf-8")] if rc == 0 else None)


def _greedy(folder, ids, stop_texts=()):
    """(completion, num_tokens) of greedy model.generate from ``ids`` alone (no prefix
    machinery), its new tokens ended as generate ends them (serve_stop.finish: stop ids,
    padding, the first stop text of the new text)."""
    model, tok = serve._load_model(str(folder), torch.device("cpu"), "float32")
    stop = serve._stop_ids(model, tok)
    with torch.no_grad():
        new = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop)[0, len(ids):].tolist()
    return finish(tok, new, stop, tok.pad_token_id, stop_texts)[:2]


def test_the_rendered_ids_are_apply_chat_templates_continuing_the_message(tmp_path, folder, monkeypatch):
    """model.generate gets the conversation ending inside the assistant message: after a
    prompt prefix, its entry's ids then the row are the whole rendering (no generation prompt)."""
    tok = chat_tokenizer(CHATML)
    fed = record_generate(monkeypatch, with_prefixes=True)
    rc, _ = _generate(tmp_path, folder, REQUESTS)
    assert rc == 0
    head = ChatTemplate(tok).system_ids("terse", TERSE)
    assert sorted((head if p == "terse" else []) + row for row, p in fed) == sorted(_full_ids(tok, r) for r in REQUESTS)
    assert tok.decode(_full_ids(tok, REQUESTS[0])).endswith('<|im_start|>assistant\nSure, here it is: {"a": ')


def test_answers_continue_the_message_as_model_generate_does(tmp_path, folder):
    """Each answer is greedy model.generate from the rendering's ids: the continuation only
    (not the prefilled text); its tokens are the new ones."""
    tok = chat_tokenizer(CHATML)
    rc, answers = _generate(tmp_path, folder, REQUESTS)
    assert rc == 0
    expected = [_greedy(folder, _full_ids(tok, r)) for r in REQUESTS]
    assert [(a["completion"], a["num_tokens"]) for a in answers] == expected
    assert len(set(expected)) > 1
    assert answers[0]["messages"] == REQUESTS[0]["messages"] and answers[0]["continue_final_message"] is True


def test_stop_texts_are_looked_for_in_the_continuation_only(tmp_path, folder):
    """A --stop text that the prefilled message holds does not end the answer at once."""
    tok = chat_tokenizer(CHATML)
    rc, answers = _generate(tmp_path, folder, [REQUESTS[0]], "--stop", "Sure", "--stop", "{")
    assert rc == 0
    completion, count = _greedy(folder, _full_ids(tok, REQUESTS[0]), ("Sure", "{"))
    assert (answers[0]["completion"], answers[0]["num_tokens"]) == (completion, count) and count > 0


BAD = [
    ({**CONTINUE, "add_generation_prompt": True},
     "'continue_final_message' and 'add_generation_prompt' are both true"),
    ({**CONTINUE, "continue_final_message": "yes"}, "'continue_final_message' must be true or false, got a string"),
    ({"messages": [ASK], "add_generation_prompt": 1}, "'add_generation_prompt' must be true or false, got a number"),
    ({"messages": [ASK], "continue_final_message": True},
     r"messages\[0\]: \"continue_final_message\": true continues the last message, which must be an assistant "
     r"message \(the start of the answer\); its role is 'user'"),
    ({"prompt": "hi", "continue_final_message": True}, "needs 'messages' ending with an assistant message"),
    ({"messages": [ASK, {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}],
      "continue_final_message": True}, "cannot continue a tool call"),
    ({"messages": [ASK, {"role": "assistant", "content": " "}], "continue_final_message": True},
     "needs the assistant message's 'content' to hold text"),
    ({"messages": [ASK, PREFILL]}, "end with a user message .*give \"continue_final_message\": true"),
]


@pytest.mark.parametrize("obj, pattern", BAD)
def test_bad_requests_name_their_line(tmp_path, obj, pattern):
    path = _write(tmp_path / "r.jsonl", [{"messages": [ASK]}, obj])
    with pytest.raises(RequestError, match=f"r.jsonl:2: .*{pattern}"):
        read_requests(path)


def test_the_fields_without_chat_are_refused(tmp_path, capsys):
    path = _write(tmp_path / "r.jsonl", [{"prompt": "a"}, {"prompt": "b", "add_generation_prompt": False}])
    assert serve.main(["-i", path, "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "prefix-attn generate: error: 1 request(s) give 'add_generation_prompt', which needs --chat" in err
    assert "r.jsonl:2" in err and "r.jsonl:1" not in err


# the final assistant message loses its text (a template keeping only answers' first line)
FIRST_LINE = CHATML.replace("m['content'] + '<|im_end|>", "m['content'].split('\\n')[0] + '<|im_end|>")
# DeepSeek-R1-like: an answer opens a think block that an assistant message's rendering leaves out
THINKS = CHATML.replace("assistant\n' }}{% endif %}", "assistant\n<think>\n' }}{% endif %}")
assert THINKS != CHATML


@pytest.mark.parametrize("template, content, pattern", [
    (FIRST_LINE, "Line one\nline two", r"r.jsonl:1: the chat template refuses this conversation continuing its "
                                       r"last message .*\(ValueError: continue_final_message is set but the final "
                                       r"message does not appear"),
    (THINKS, "Sure", r"r.jsonl:1: the chat template writes the conversation continuing the last \(assistant\) "
                     r"message otherwise than it opens a new answer .*'<think>\\n' opening an answer but 'Sure' "
                     r"before the message continued"),
])
def test_a_template_rewriting_the_message_continued_is_refused(template, content, pattern, tmp_path):
    """Where the template does not write the assistant message as given, or writes it
    otherwise than it opens an answer, the request is refused, not continued wrongly."""
    requests = read_requests(_write(tmp_path / "r.jsonl", [{"messages": [ASK, {"role": "assistant", "content": content}],
                                                             "continue_final_message": True}]))
    with pytest.raises(RequestError, match=pattern):
        ChatTemplate(chat_tokenizer(template)).request_ids(requests, None, str(tmp_path / "r.jsonl"))


def test_a_message_opened_as_the_generation_prompt_opens_it_is_served(tmp_path):
    """The refusal's advice holds: the message starting with the think block is continued."""
    r = {"messages": [ASK, {"role": "assistant", "content": "<think>\nFirst"}], "continue_final_message": True}
    requests = read_requests(_write(tmp_path / "r.jsonl", [r]))
    tok = chat_tokenizer(THINKS)
    ids = ChatTemplate(tok).request_ids(requests, None, "r.jsonl")[1]
    assert ids == _full_ids(tok, r) and tok.decode(ids).endswith("<|im_start|>assistant\n<think>\nFirst")


def test_serve_continues_the_message_streamed_or_not(tmp_path, folder):
    """/v1/chat/completions: the answer and its usage are generate's (prompt_tokens count the
    prefilled tokens), streamed pieces add up to it; both fields true is a 400 naming them."""
    requests = [r for r in REQUESTS if r["id"] in ("c", "p")]
    _, expected = _generate(tmp_path, folder, requests)
    tok = chat_tokenizer(CHATML)
    head = len(ChatTemplate(tok).system_ids("terse", TERSE))
    with started("--model", str(folder), "--chat", "--prompt-prefix", f"terse={TERSE}", "--max-new-tokens", "8") as s:
        for r, e in zip(requests, expected):
            body = {k: v for k, v in r.items() if k != "id"}
            status, got = call(s, "/v1/chat/completions", body)
            assert answer((status, got), chat=True) == (e["completion"], e["num_tokens"], e["finish_reason"])
            assert got["usage"]["prompt_tokens"] == len(_full_ids(tok, r)) - (head if r.get("prefix") else 0)
            texts, reason = pieces(streamed(s, body, "/v1/chat/completions"), chat=True)
            assert ("".join(texts), reason) == (e["completion"], e["finish_reason"])
        status, got = call(s, "/v1/chat/completions", {**CONTINUE, "add_generation_prompt": True})
        assert status == 400 and "'continue_final_message' and 'add_generation_prompt' are both true" in \
            got["error"]["message"]
        status, got = call(s, "/v1/chat/completions", {"messages": [ASK], "continue_final_message": True})
        assert status == 400 and "its role is 'user'" in got["error"]["message"]
