"""Structured outputs (prefix_attn.structured, structured_logits): "response_format" and a
"tool_choice" forcing a call, served by ``prefix-attn serve`` and ``generate`` with xgrammar.
The models have random weights: only the grammar makes their answers JSON of the schema."""
import json
import subprocess
import sys

import pytest

from prefix_attn import structured

from test_serve_chat import _model, chat_tokenizer, record_generate
from test_server import CHATML, call, generated, started
from test_server_stream import streamed

pytestmark = pytest.mark.hf
pytest.importorskip("xgrammar")  # requirements-dev.txt pins it: CI runs these

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                                           "tags": {"type": "array", "items": {"enum": [1, 2, 3]}, "maxItems": 2}},
          "required": ["ok", "size", "tags"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
             "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
             "additionalProperties": False}}},
         {"type": "function", "function": {"name": "clock", "parameters": {
             "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
             "additionalProperties": False}}}]
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def matches(value, schema) -> bool:
    """Whether ``value`` matches ``schema`` (the keywords the tests' schemas use)."""
    if "enum" in schema:
        return value in schema["enum"] and type(value) in {type(e) for e in schema["enum"]}
    kind = schema.get("type")
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return (isinstance(value, list) and len(value) >= schema.get("minItems", 0)
                and len(value) <= schema.get("maxItems", len(value)) and all(matches(v, schema["items"]) for v in value))
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and (schema.get("additionalProperties", True) or set(value) <= set(props))
                and all(matches(v, props[k]) for k, v in value.items() if k in props))
    raise AssertionError(f"schema keyword not checked here: {schema}")


def test_generate_lines_with_response_format_give_json_of_the_schema(tmp_path):
    """Each constrained line's completion parses (and matches its schema), finish_reason
    "stop"; without the grammar the random model writes no JSON."""
    requests = [{"prompt": "hi", "response_format": JSON_SCHEMA, "max_tokens": 60},
                {"prompt": "hello", "response_format": {"type": "json_object"}, "max_tokens": 60},
                {"prompt": "hi", "max_tokens": 60}]
    got = generated(tmp_path, requests)
    assert got[0]["finish_reason"] == got[1]["finish_reason"] == "stop"
    assert matches(json.loads(got[0]["completion"]), SCHEMA)
    assert isinstance(json.loads(got[1]["completion"]), dict)
    with pytest.raises(ValueError):
        json.loads(got[2]["completion"])


def test_a_constrained_row_leaves_its_batch_mates_free(tmp_path, monkeypatch):
    """A constrained and a free request decoded alike share one model.generate call; the free
    one's answer is the one it gets alone."""
    free = {"prompt": "abc", "max_tokens": 60}
    alone = generated(tmp_path, [free])[0]
    fed = record_generate(monkeypatch)
    both = generated(tmp_path, [{"prompt": "xyz", "max_tokens": 60, "response_format": JSON_SCHEMA}, free])
    assert len(fed) == 2  # one call: its two rows recorded
    assert matches(json.loads(both[0]["completion"]), SCHEMA)
    assert (both[1]["completion"], both[1]["num_tokens"]) == (alone["completion"], alone["num_tokens"])


def test_max_tokens_before_the_json_closes_is_length_and_the_text_so_far(tmp_path):
    got = generated(tmp_path, [{"prompt": "hi", "response_format": JSON_SCHEMA, "max_tokens": 5}])[0]
    assert (got["finish_reason"], got["num_tokens"]) == ("length", 5)
    assert got["completion"].startswith('{"ok"'[:len(got["completion"])]) and len(got["completion"]) == 5


def test_generate_refuses_bad_constraints_before_loading(tmp_path, capsys):
    from prefix_attn import serve

    src = tmp_path / "r.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 3}}}}) + "\n", encoding="utf-8")
    assert serve.main(["-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    assert "'response_format': the schema is not one xgrammar can compile" in capsys.readouterr().err
    src.write_text(json.dumps({"prompt": "hi", "response_format": {"type": "json_object"}, "num_beams": 2}) + "\n")
    assert serve.main(["-i", str(src), "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    assert "not served with beam search" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


@pytest.fixture(scope="module")
def server():
    with started("--max-new-tokens", "60", "--batch-wait-ms", "0") as s:
        yield s


def test_completions_with_response_format_and_n(server):
    status, body = call(server, "/v1/completions", {"prompt": "hi", "response_format": JSON_SCHEMA, "n": 2,
                                                     "temperature": 1.0})
    assert status == 200, body
    for choice in body["choices"]:  # each sampled row its own grammar
        assert choice["finish_reason"] == "stop" and matches(json.loads(choice["text"]), SCHEMA)


def test_constrained_content_streams(server):
    body = {"prompt": "hi", "response_format": JSON_SCHEMA}
    expected = call(server, "/v1/completions", body)[1]["choices"][0]["text"]
    chunks = [c["choices"][0] for c in streamed(server, body) if c["choices"]]
    assert len(chunks) > 2 and "".join(c["text"] for c in chunks) == expected
    assert chunks[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format", "not one xgrammar can compile"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format", "'name'"),
    ({"response_format": {"type": "yaml"}}, "response_format", "must be"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tool_choice": "sometimes"}, "tool_choice", "must be"),
    ({"response_format": {"type": "json_object"}, "num_beams": 2}, "num_beams", "beam search"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs a conversation"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, param, words):
    status, answer = call(server, "/v1/completions", {"prompt": "hi", **body})
    assert status == 400 and answer["error"]["param"] == param and words in answer["error"]["message"], answer


def test_without_xgrammar_a_constraint_is_400_naming_the_package(server, monkeypatch):
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar raises ImportError
    status, answer = call(server, "/v1/completions", {"prompt": "hi", "response_format": {"type": "json_object"}})
    assert status == 400 and answer["error"]["param"] == "response_format"
    assert "xgrammar" in answer["error"]["message"] and "pip install xgrammar" in answer["error"]["message"]
    assert call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})[0] == 200  # others as before


def test_startup_does_not_import_xgrammar():
    code = ("import sys, threading; from prefix_attn.cli import build_parser; from prefix_attn import serve_http\n"
            "s = serve_http.Server(build_parser().parse_args(['serve', '--port', '0', '--quiet']))\n"
            "s.close(); assert 'xgrammar' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    _model().save_pretrained(str(folder))
    chat_tokenizer(CHATML).save_pretrained(str(folder))
    with started("--model", str(folder), "--chat", "--max-new-tokens", "60", "--batch-wait-ms", "0") as s:
        yield s


def test_named_tool_choice_is_one_call_of_that_function(chat_server):
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "clock"}}}
    status, answer = call(chat_server, "/v1/chat/completions", body)
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["id"].startswith("call_")
    assert tool_call["function"]["name"] == "clock"
    assert matches(json.loads(tool_call["function"]["arguments"]), TOOLS[1]["function"]["parameters"])


def test_required_tool_choice_is_calls_of_the_tools(chat_server):
    """"required": calls of the tools ("parallel_tool_calls": false: one); an array max_tokens
    cut (the random model repeats its call) stays content, finish_reason "length"."""
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": "required"}
    status, answer = call(chat_server, "/v1/chat/completions", {**body, "parallel_tool_calls": False})
    assert status == 200, answer
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None, choice
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    [tool_call] = choice["message"]["tool_calls"]
    assert matches(json.loads(tool_call["function"]["arguments"]), schemas[tool_call["function"]["name"]])
    choice = call(chat_server, "/v1/chat/completions", body)[1]["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('[{"name": "')


def test_a_forced_call_streams_at_the_end(chat_server):
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}}
    chunks = [c["choices"][0] for c in streamed(chat_server, body, "/v1/chat/completions") if c["choices"]]
    assert [c["delta"] for c in chunks[:1]] == [{"role": "assistant", "content": ""}]
    [calls] = [c["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["delta"]]
    assert not any(c["delta"].get("content") for c in chunks)
    assert calls[0]["function"]["name"] == "weather" and chunks[-1]["finish_reason"] == "stop"
    assert matches(json.loads(calls[0]["function"]["arguments"]), TOOLS[0]["function"]["parameters"])


def test_a_tool_choice_naming_no_tool_is_400(chat_server):
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    status, answer = call(chat_server, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "tool_choice"
    assert "'nope'" in answer["error"]["message"] and "weather, clock" in answer["error"]["message"]


def test_the_grammar_cache_keeps_the_most_recent():
    from prefix_attn import tiny
    from prefix_attn.structured_logits import Grammars

    grammars = Grammars(tiny.ByteTokenizer(), 259, [2], size=2)
    first = grammars.compiled('{"type": "object"}')
    grammars.compiled('{"type": "array"}')
    assert grammars.compiled('{"type": "object"}') is first  # cached
    grammars.compiled('{"type": "boolean"}')  # drops the least recent: the array's
    assert list(grammars._compiled) == ['{"type": "object"}', '{"type": "boolean"}']


def test_auto_and_none_ask_for_nothing():
    assert structured.of({"tool_choice": "auto", "response_format": {"type": "text"}}, TOOLS) is None


@pytest.mark.parametrize("schema", [{"type": "string", "maxLength": 4}, {"type": "object", "properties": {
    "s": {"type": "string", "minLength": 1}}, "required": ["s"], "additionalProperties": False}])
def test_no_control_character_in_a_constrained_answer(schema):
    """xgrammar 0.2.9 lets a string with minLength / maxLength take control characters, which
    JSON forbids unescaped: a model favouring one gave a "stop" answer json.loads refused."""
    import torch

    from prefix_attn import tiny
    from prefix_attn.structured_logits import Grammars

    tok = tiny.ByteTokenizer()
    grammars = Grammars(tok, 264, [tok.eos_token_id])
    rows = grammars.processor([structured.Constraint("json_schema", json.dumps(schema))], 1)
    favour = [tok.offset + 0x0E, tok.offset + ord('"'), tok.offset + ord("x"), tok.eos_token_id]
    ids = torch.tensor([[tok.offset + ord("a")]])
    for _ in range(20):
        scores = torch.zeros(1, 264)
        scores[0, favour] = torch.tensor([4.0, 3.0, 2.0, 1.0])
        token = rows(ids, scores).argmax(-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if token.item() == tok.eos_token_id:
            break
    text = tok.decode(ids[0, 1:].tolist(), skip_special_tokens=True)
    assert ids[0, -1].item() == tok.eos_token_id and "\x0e" not in text
    json.loads(text)
