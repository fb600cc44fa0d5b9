"""``--tool-call-parser``: tool calls in a chat answer parsed into OpenAI's ``tool_calls``
(:mod:`prefix_attn.tool_calls`), by ``prefix-attn generate`` and ``serve``, streamed or not."""
import json
import re

import pytest

from prefix_attn import tool_calls

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]
PARIS = ("get_weather", {"city": "Paris"})
OSLO = ("get_weather", {"city": "Oslo; Norway"})


def _calls(parsed):
    """(name, arguments) of each call, its OpenAI form checked."""
    for c in parsed.calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function"
        assert re.fullmatch(r"call_[0-9a-f]{24}", c["id"])
        assert isinstance(c["function"]["arguments"], str)
    assert len({c["id"] for c in parsed.calls}) == len(parsed.calls)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls]


def _hermes(name, args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


@pytest.mark.parametrize("parser, text, content, calls", [
    ("hermes", _hermes(*PARIS), None, [PARIS]),
    ("hermes", "Let me look.\n\n" + _hermes(*PARIS) + "\n" + _hermes(*OSLO) + "\n", "Let me look.", [PARIS, OSLO]),
    ("hermes", '<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", {})]),
    ("llama3_json", json.dumps({"name": "get_weather", "parameters": PARIS[1]}), None, [PARIS]),
    ("llama3_json", "<|python_tag|>" + json.dumps({"name": "get_weather", "parameters": PARIS[1]}) + "; "
     + json.dumps({"name": "get_weather", "arguments": OSLO[1]}), None, [PARIS, OSLO]),
    ("mistral", "[TOOL_CALLS]" + json.dumps([{"name": n, "arguments": a} for n, a in (PARIS, OSLO)]),
     None, [PARIS, OSLO]),
    ("mistral", "Sure. [TOOL_CALLS] " + json.dumps({"name": "get_weather", "arguments": PARIS[1]}), "Sure.", [PARIS]),
    # Mistral's tokenizer v11+: each call its own [TOOL_CALLS]name[ARGS]{...}
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', None, [PARIS]),
    ("mistral", 'Checking.\n[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}\n',
     "Checking.", [PARIS, ("get_time", {})]),
    ("mistral", '[TOOL_CALLS]get_weather{"city": "Paris"} [TOOL_CALLS]get_weather{"city": "Oslo; Norway"}',
     None, [PARIS, OSLO]),  # decoded without special tokens: no [ARGS]
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris"}', None, [PARIS]),  # v13
])
def test_parsers_find_the_calls_and_the_content_before_them(parser, text, content, calls):
    parsed = tool_calls.parse(parser, text, TOOLS)
    assert parsed is not None and parsed.content == content and _calls(parsed) == calls


@pytest.mark.parametrize("parser, text", [
    ("hermes", "The weather is fine."),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Par</tool_call>'),  # malformed JSON
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # not closed (max_tokens)
    ("hermes", _hermes(*PARIS) + " and then some text"),
    ("hermes", _hermes("get_stock", {"ticker": "X"})),  # not among the request's tools
    ("hermes", _hermes(*PARIS) + _hermes("get_stock", {})),  # all or nothing
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>'),  # arguments not an object
    ("llama3_json", "Paris is sunny."),
    ("llama3_json", '{"name": "get_weather", "parameters": {}} {"name": "get_time"}'),  # no ';'
    ("llama3_json", '{"city": "Paris"}'),  # no name
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {}}'),
    ("mistral", '[{"name": "get_weather", "arguments": {}}]'),  # no [TOOL_CALLS]
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Par'),  # cut by max_tokens
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]["Paris"]'),  # arguments not an object
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} and more'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_stock[ARGS]{}'),  # all or nothing
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]'),  # no arguments
])
def test_answers_that_do_not_parse_stay_content(parser, text):
    assert tool_calls.parse(parser, text, TOOLS) is None


def test_no_parser_and_no_tools_parse_nothing():
    assert tool_calls.parse(None, _hermes(*PARIS), TOOLS) is None
    assert tool_calls.parse("hermes", _hermes(*PARIS), None) is None


@pytest.mark.parametrize("parser, pieces, sent", [
    ("hermes", ["Let ", "me look.\n", "<tool", "_call>\n{", '"name"', "}\n</tool_call>"], ["Let", " me look."]),
    ("hermes", ["a <", "b"], ["a", " <b"]),  # "<" might have begun the marker: held, then sent
    ("mistral", ["Sure", ". [TOOL", "_CALLS][{"], ["Sure", "."]),
    ("llama3_json", ["\n", "{\"name\"", ": 1}"], []),
    ("llama3_json", ["<|py", "thon_tag|>{"], []),
    ("llama3_json", ["Hot", " today"], ["Hot", " today"]),
    (None, ["<tool_call>", "{"], ["<tool_call>", "{"]),
])
def test_a_stream_holds_back_what_may_be_tool_calls(parser, pieces, sent):
    take = tool_calls.holder(parser)
    assert [out for out in map(take, pieces) if out] == sent


def test_the_parser_needs_chat():
    assert "needs --chat" in tool_calls.need_chat("hermes", False)
    assert tool_calls.need_chat("hermes", True) is None and tool_calls.need_chat(None, False) is None


# -- end to end: a tiny model with a Qwen2.5-like template, made to answer a tool call -----------

ANSWER = "Checking.\n" + _hermes(*PARIS)  # <tool_call> is a special token of this tokenizer
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Llama saved with the qwen2.5 family's tokenizer (tests/chat_templates.py)."""
    from chat_templates import VOCAB_SIZE, family_tokenizer
    from prefix_attn import tiny

    folder = tmp_path_factory.mktemp("tool-calls") / "qwen"
    tiny.tiny_model("llama", vocab_size=VOCAB_SIZE, hidden=64, heads=4, kv_heads=2,
                    max_position_embeddings=2048).save_pretrained(str(folder))
    family_tokenizer("qwen2.5").save_pretrained(str(folder))
    return str(folder)


def forced(model, tokenizer, text=ANSWER):
    """``model.generate`` made to answer ``text`` then the end of turn, whatever the prompt
    (each step's scores put on the next forced token): streamers and stop texts see it as any
    answer."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.convert_tokens_to_ids("<tool_call>") in ids

    class Force(LogitsProcessor):
        def __init__(self, start):
            self.start = start

        def __call__(self, input_ids, scores):
            step = min(input_ids.shape[1] - self.start, len(ids) - 1)
            out = torch.full_like(scores, -float("inf"))
            out[:, ids[step]] = 0
            return out
    generate = model.generate

    def forcing(input_ids, **kw):
        return generate(input_ids, logits_processor=LogitsProcessorList([Force(input_ids.shape[1])]), **kw)
    model.generate = forcing


def _generate(tmp_path, monkeypatch, folder, requests, *options):
    from prefix_attn import serve

    load_model = serve._load_model

    def loading(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        forced(model, tok)
        return model, tok
    src, out = tmp_path / "r.jsonl", tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests), encoding="utf-8")
    with monkeypatch.context() as m:
        m.setattr(serve, "_load_model", loading)
        assert serve.main(["-i", str(src), "-o", str(out), "--model", folder, "--chat", "--no-progress",
                           "--max-new-tokens", "80", *options]) == 0
    return [json.loads(line) for line in open(out, encoding="utf-8")]


@pytest.mark.hf
def test_generate_writes_the_parsed_tool_calls(tmp_path, monkeypatch, qwen):
    """generate --tool-call-parser hermes: a request with tools gets "tool_calls", the content
    before them as "completion", finish_reason "tool_calls"; one without tools, or with
    "tool_choice": "none", and every request without the option, is answered as before."""
    requests = [{"messages": QUESTION, "tools": TOOLS}, {"messages": QUESTION},
                {"messages": QUESTION, "tools": TOOLS, "tool_choice": "none"}]
    parsed, plain, none = _generate(tmp_path, monkeypatch, qwen, requests, "--tool-call-parser", "hermes")
    assert (parsed["completion"], parsed["finish_reason"]) == ("Checking.", "tool_calls")
    assert _calls(tool_calls.Parsed(None, parsed["tool_calls"])) == [PARIS]
    text = ANSWER.replace("<tool_call>", "").replace("</tool_call>", "")  # special tokens skipped: as before
    assert [(r["completion"], r["finish_reason"], "tool_calls" in r) for r in (plain, none)] == [(text, "stop", False)] * 2
    before = _generate(tmp_path, monkeypatch, qwen, requests)
    assert [(r["completion"], "tool_calls" in r) for r in before] == [(text, False)] * 3


def test_generate_refuses_the_parser_without_chat(tmp_path, capsys):
    from prefix_attn import serve

    src = tmp_path / "r.jsonl"
    src.write_text('{"prompt": "x"}\n', encoding="utf-8")
    assert serve.main(["-i", str(src), "-o", str(tmp_path / "a.jsonl"), "--tool-call-parser", "hermes"]) == 2
    assert "prefix-attn generate: error: --tool-call-parser hermes: tool calls are parsed from chat answers: " \
           "it needs --chat" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


@pytest.fixture(scope="module")
def server(qwen):
    from test_server import started

    with started("--model", qwen, "--chat", "--tool-call-parser", "hermes", "--max-new-tokens", "80",
                 "--batch-wait-ms", "0") as s:
        forced(s.served.model, s.served.tokenizer)
        yield s


@pytest.mark.hf
def test_serve_answers_tool_calls_and_takes_them_back(server):
    """/v1/chat/completions: the call in message.tool_calls, the text before it as content,
    finish_reason "tool_calls"; the conversation sent back with that assistant message and the
    tool's result is rendered (the call and the result in the prompt) and answered."""
    from test_server import call

    status, body = call(server, "/v1/chat/completions", {"messages": QUESTION, "tools": TOOLS})
    assert status == 200, body
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    assert _calls(tool_calls.Parsed(None, choice["message"]["tool_calls"])) == [PARIS]
    call_id = choice["message"]["tool_calls"][0]["id"]
    back = QUESTION + [choice["message"], {"role": "tool", "tool_call_id": call_id, "content": '{"temp": 21}'}]
    rendered = []
    render = server.served.chat.render
    server.served.chat.render = lambda messages, *a, **k: rendered.append(render(messages, *a, **k)) or rendered[-1]
    try:
        status, again = call(server, "/v1/chat/completions", {"messages": back, "tools": TOOLS})
    finally:
        server.served.chat.render = render
    assert status == 200 and again["choices"][0]["finish_reason"] == "tool_calls", again
    prompt = server.served.tokenizer.decode(rendered[-1])
    assert "<tool_call>\n{\"name\": \"get_weather\"" in prompt and '<tool_response>\n{"temp": 21}' in prompt
    status, plain = call(server, "/v1/chat/completions", {"messages": QUESTION})  # no tools: no parsing
    assert plain["choices"][0]["finish_reason"] == "stop" and "tool_calls" not in plain["choices"][0]["message"]


@pytest.mark.hf
def test_a_stream_sends_the_content_then_the_tool_calls(server):
    """Streamed: content pieces up to the call (none of the call's text), then one chunk of
    delta.tool_calls, then finish_reason "tool_calls"."""
    from test_server_stream import streamed

    chunks = streamed(server, {"messages": QUESTION, "tools": TOOLS}, "/v1/chat/completions")
    choices = [c["choices"][0] for c in chunks]
    assert choices[0]["delta"] == {"role": "assistant", "content": ""}
    texts = [ch["delta"]["content"] for ch in choices[1:] if "content" in ch["delta"]]
    assert "".join(texts) == "Checking." and all(texts)
    (with_calls,) = [ch for ch in choices if "tool_calls" in ch["delta"]]
    assert choices.index(with_calls) == len(choices) - 2 and with_calls["finish_reason"] is None
    (delta,) = with_calls["delta"]["tool_calls"]
    assert delta["index"] == 0 and _calls(tool_calls.Parsed(None, [
        {k: v for k, v in delta.items() if k != "index"}])) == [PARIS]
    assert (choices[-1]["delta"], choices[-1]["finish_reason"]) == ({}, "tool_calls")


def test_serve_refuses_the_parser_without_chat(capsys):
    from prefix_attn import serve_http

    assert serve_http.main(["--port", "0", "--tool-call-parser", "mistral"]) == 2
    assert "prefix-attn serve: error: --tool-call-parser mistral: tool calls are parsed from chat answers: " \
           "it needs --chat" in capsys.readouterr().err
