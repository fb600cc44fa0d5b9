"""``--chat`` with OpenAI-style tool use: a request's / example's ``"tools"`` (function schemas)
given to the chat template as ``apply_chat_template(..., tools=tools)`` does, assistant turns
that are tool calls (``content`` null, ``tool_calls``), tool messages with their results."""
import json

import pytest

from prefix_attn.serve import RequestError, read_requests
from test_serve_chat import _write, record_generate, save_adapter

# Hermes / Qwen-like: the tools written into the system part, tool calls as <tool_call> JSON
TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>' }}{% for t in tools %}{{ '\n' + (t | tojson) }}{% endfor %}"
    "{{ '\n</tools><|im_end|>\n' }}"
    "{% elif messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% for c in m['tool_calls'] or [] %}{{ '<tool_call>\n' + ({'name': c['function']['name'], "
    "'arguments': c['function']['arguments']} | tojson) + '\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + '\n</tool_response><|im_end|>\n' }}"
    "{% elif m['role'] == 'user' %}{{ '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_TURN = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": None, "tool_calls": [CALL]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "{\"temp\": 21}"}]


def test_tool_calls_and_tool_messages_are_taken_as_they_are(tmp_path):
    """An assistant turn that is a tool call (content null, or left out) and the tool's result
    (with tool_call_id / name) go to the template untouched."""
    no_content = [TOOL_TURN[0], {"role": "assistant", "tool_calls": [CALL]}, TOOL_TURN[2]]
    f = _write(tmp_path / "r.jsonl", [json.dumps({"messages": TOOL_TURN}), json.dumps({"messages": no_content})])
    requests = read_requests(f)
    assert [r.messages for r in requests] == [TOOL_TURN, no_content]


@pytest.mark.parametrize("message, pattern", [
    ({"role": "assistant", "content": None}, r"messages\[1\]: 'content' must be a string; got null \(null or left "
                                             r"out only with a non-empty 'tool_calls'\)"),
    ({"role": "assistant", "content": None, "tool_calls": []}, r"messages\[1\]: 'content' must be a string; got null"),
    ({"role": "assistant", "tool_calls": {"a": 1}}, r"messages\[1\]: 'tool_calls' must be an array of objects .*got an object"),
    ({"role": "assistant", "tool_calls": [CALL, "x"]},
     r"messages\[1\]: 'tool_calls' must be an array of objects .*got an array holding a string"),
    ({"role": "user", "content": "a", "tool_calls": [CALL]}, r"messages\[1\]: 'tool_calls' only on an assistant message"),
])
def test_bad_tool_calls_are_refused_naming_file_and_line(tmp_path, message, pattern):
    line = {"messages": [TOOL_TURN[0], message, TOOL_TURN[2]]}
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', json.dumps(line)])
    with pytest.raises(RequestError, match="r.jsonl:2: " + pattern):
        read_requests(f)


def test_arguments_given_as_json_text_render_as_the_object(tmp_path):
    """OpenAI's tool_calls carry "arguments" as JSON text; a template writing the call with
    tojson (this Hermes-like one) would write it as a JSON string, encoded twice, so the text is
    given to it as the object (the request's messages are kept as given). Text that is not a
    JSON object is refused, naming it."""
    from prefix_attn.chat import ChatTemplate
    from test_serve_chat import chat_tokenizer

    as_text = {**CALL, "function": {**CALL["function"], "arguments": json.dumps(CALL["function"]["arguments"])}}
    turn = [TOOL_TURN[0], {"role": "assistant", "content": None, "tool_calls": [as_text]}, TOOL_TURN[2]]
    f = _write(tmp_path / "r.jsonl", [json.dumps({"messages": turn})])
    (text,) = read_requests(f)
    assert text.messages == turn
    tok = chat_tokenizer(TOOLS_TEMPLATE)
    assert ChatTemplate(tok).render(text.messages, True) == list(tok.apply_chat_template(
        TOOL_TURN, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert text.messages == turn
    bad = {**CALL, "function": {**CALL["function"], "arguments": "city=Paris"}}
    f = _write(tmp_path / "b.jsonl", [json.dumps({"messages": [TOOL_TURN[0], {"role": "assistant",
                                                                              "tool_calls": [bad]}, TOOL_TURN[2]]})])
    with pytest.raises(RequestError, match=r"b.jsonl:1: messages\[1\]: tool_calls\[0\].function.arguments is a "
                                           r"string that is not a JSON object \('city=Paris'\)"):
        read_requests(f)


# -- "tools" ---------------------------------------------------------------------------------

# tools in a turn of their own after the first message: a system message alone is the start
TOOLS_OWN_TURN = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] or (m['tool_calls'] | tojson)) + '<|im_end|>\n' }}"
    "{% if loop.first and tools %}{{ '<|im_start|>tools\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

TERSE = "You are terse."
REQUESTS = [
    {"id": "after-result", "messages": TOOL_TURN, "tools": [WEATHER]},
    {"id": "prompt", "prompt": "Weather in Oslo?", "tools": [WEATHER], "tag": 1},
    {"id": "adapter", "prefix": "tenant", "messages": TOOL_TURN[:1], "tools": [WEATHER]},
    {"id": "history", "prefix": "terse", "messages": TOOL_TURN},  # a prompt prefix, no tools
    {"id": "none", "prompt": "no tools"},
    {"id": "own-system", "messages": [{"role": "system", "content": TERSE}, *TOOL_TURN], "tools": [WEATHER]},
]


def _conversation(r):
    messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
    return ([{"role": "system", "content": TERSE}] if r.get("prefix") == "terse" else []) + messages


def _full(tok, r, generation_prompt=True):
    return tok.apply_chat_template(_conversation(r), tools=r.get("tools"), add_generation_prompt=generation_prompt,
                                   tokenize=True, return_dict=False)


def _model():
    from prefix_attn import tiny
    from test_serve_chat import chat_tokenizer

    return tiny.tiny_model("llama", vocab_size=len(chat_tokenizer()), hidden=64, heads=4, kv_heads=2,
                           max_position_embeddings=1024)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama (1024 positions: tool schemas are long in bytes) saved with the tools
    template, and a PEFT adapter for it."""
    from test_serve_chat import chat_tokenizer

    root = tmp_path_factory.mktemp("tools")
    model = _model()
    model.save_pretrained(str(root / "tools"))
    chat_tokenizer(TOOLS_TEMPLATE).save_pretrained(str(root / "tools"))
    save_adapter(model, root / "adapter", seed=3)
    return root


class _Bank:  # what request_ids asks of the bank: each prefix's kind
    @staticmethod
    def kind(name):
        return "prompt" if name == "terse" else "adapter"


@pytest.mark.hf
@pytest.mark.parametrize("template", ["tools", "own_turn"])
def test_request_ids_are_the_whole_conversation_with_its_tools(tmp_path, template):
    """Each request's ids are apply_chat_template(conversation, tools=its tools) (less the system
    part's after a prompt prefix); a template writing the tools after the system message serves
    a prompt prefix with tools too."""
    from prefix_attn.chat import ChatTemplate
    from test_serve_chat import chat_tokenizer

    tok = chat_tokenizer(TOOLS_TEMPLATE if template == "tools" else TOOLS_OWN_TURN)
    requests = REQUESTS + ([{"id": "prefix-tools", "prefix": "terse", "prompt": "q", "tools": [WEATHER]}]
                           if template == "own_turn" else [])
    chat = ChatTemplate(tok)
    head = chat.system_ids("terse", TERSE)
    f = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in requests])
    ids = chat.request_ids(read_requests(f), _Bank, f)
    for line, r in enumerate(requests, 1):
        full = _full(tok, r)
        assert (head + ids[line] if r.get("prefix") == "terse" else ids[line]) == full, r["id"]
        if "tools" in r:
            assert "get_weather" in tok.decode(full) and full != _full(tok, {**r, "tools": None})


@pytest.mark.hf
@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_answers_equal_generate_on_the_templated_conversation_with_tools(tmp_path, folders, batch_size):
    """Greedy answers of requests with tools, tool calls and tool results (with and without an
    adapter, after a prompt prefix without tools): each equals model.generate on
    apply_chat_template(whole conversation, tools=..., add_generation_prompt=True)."""
    import torch

    from prefix_attn import serve, tiny
    from prefix_attn.bank import PrefixBank

    f = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in REQUESTS])
    out = tmp_path / "o.jsonl"
    assert serve.main(["-i", f, "-o", str(out), "--model", str(folders / "tools"), "--chat",
                       "--prompt-prefix", f"terse={TERSE}", "--adapter", f"tenant={folders / 'adapter'}",
                       "--max-new-tokens", "5", "--batch-size", batch_size, "--no-progress"]) == 0
    res = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [r["id"] for r in res] == [r["id"] for r in REQUESTS]
    assert res[0]["tools"] == [WEATHER] and res[0]["messages"] == TOOL_TURN and res[1]["tag"] == 1

    tok = tiny.load_tokenizer(str(folders / "tools"))
    model = tiny.load_model_folder(str(folders / "tools"))
    PrefixBank.attach(model).load_peft("tenant", str(folders / "adapter"))
    expected = []
    for r in REQUESTS:
        ids = _full(tok, r)
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               prefixes=["tenant"] if r.get("prefix") == "tenant" else None)
        new = g[0, len(ids):].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        expected.append((tok.decode(new, skip_special_tokens=True), len(new)))
    assert [(r["completion"], r["num_tokens"]) for r in res] == expected


@pytest.mark.hf
def test_generate_feeds_arguments_given_as_json_text_as_the_object_and_echoes_the_text(tmp_path, folders,
                                                                                      monkeypatch):
    """The agent loop: the call sent back with OpenAI's "arguments" text is fed as the template
    renders the object (after a prompt prefix too), and the result echoes the messages as given."""
    from prefix_attn import serve, tiny
    from prefix_attn.chat import ChatTemplate
    from test_serve_chat import record_generate

    as_text = {**CALL, "function": {**CALL["function"], "arguments": json.dumps(CALL["function"]["arguments"])}}
    turn = [TOOL_TURN[0], {"role": "assistant", "content": None, "tool_calls": [as_text]}, TOOL_TURN[2]]
    requests = [{"messages": turn, "tools": [WEATHER]}, {"prefix": "terse", "messages": turn}]
    fed = record_generate(monkeypatch, with_prefixes=True)
    out = tmp_path / "o.jsonl"
    assert serve.main(["-i", _write(tmp_path / "r.jsonl", [json.dumps(r) for r in requests]), "-o", str(out),
                       "--model", str(folders / "tools"), "--chat", "--prompt-prefix", f"terse={TERSE}",
                       "--max-new-tokens", "2", "--batch-size", "1", "--no-progress"]) == 0
    assert [r["messages"] for r in map(json.loads, open(out, encoding="utf-8"))] == [turn, turn]
    tok = tiny.load_tokenizer(str(folders / "tools"))
    system = ChatTemplate(tok).system_ids("terse", TERSE)
    assert [(system if p == "terse" else []) + row for row, p in fed] == [
        _full(tok, {**r, "messages": TOOL_TURN}) for r in requests]


@pytest.mark.hf
def test_a_prompt_prefix_with_tools_the_template_writes_into_the_system_part_is_refused(tmp_path, folders, capsys):
    """The tools template writes the tools into the system part: [system] alone is not the
    start of a conversation with tools, so its KV cannot be the prefix; refused naming the
    prefix and that request only, nothing written; the same conversation with its system
    message in "messages" (no prefix) is served."""
    from prefix_attn import serve

    f = _write(tmp_path / "r.jsonl", [json.dumps({"prefix": "terse", "prompt": "q", "tools": [WEATHER]}),
                                      json.dumps({"prefix": "terse", "prompt": "no tools"})])
    out = tmp_path / "o.jsonl"
    args = ["-o", str(out), "--model", str(folders / "tools"), "--chat", "--max-new-tokens", "2", "--no-progress"]
    assert serve.main(["-i", f, *args, "--prompt-prefix", f"terse={TERSE}"]) == 2
    err = capsys.readouterr().err
    assert "cannot be shared as a prefix with this chat template" in err and "requests giving \"tools\"" in err
    assert "--prompt-prefix terse:" in err and "r.jsonl:1" in err and "r.jsonl:2" not in err
    assert not out.exists()
    f = _write(tmp_path / "m.jsonl", [json.dumps({"messages": [{"role": "system", "content": TERSE},
                                                               {"role": "user", "content": "q"}], "tools": [WEATHER]})])
    assert serve.main(["-i", f, *args]) == 0


@pytest.mark.parametrize("tools, got", [({"a": 1}, "an object"), ([WEATHER, "x"], "an array holding a string"),
                                        ("x", "a string")])
def test_bad_tools_are_refused_naming_file_and_line(tmp_path, tools, got):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', json.dumps({"prompt": "a", "tools": tools})])
    with pytest.raises(RequestError, match=r"r.jsonl:2: 'tools' must be an array of objects \(function schemas, "
                                           r".*\); got " + got):
        read_requests(f)


def test_null_tools_are_no_tools():
    """OpenAI's API takes "tools": null (no tools); it was refused, though "tool_calls": null
    was taken. A null is no tools: without --chat too."""
    from prefix_attn.serve_inputs import _parse_request

    r = _parse_request({"prompt": "a", "tools": None}, "r.jsonl:1", 1)
    assert r.tools is None and r.extra == {"tools": None}  # echoed as given
    from prefix_attn import train_chat, train_data

    assert train_data._example("d.jsonl:1", {"prompt": "a", "completion": "b", "tools": None}) == ("a", "b")
    assert train_chat._conversation("d.jsonl:1", {"prompt": "a", "completion": "b", "tools": None})[1] is None


def test_tools_without_chat_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from prefix_attn import serve

    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(serve, "_load_model", fail)
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', json.dumps({"prompt": "a", "tools": [WEATHER]}),
                                      json.dumps({"messages": [{"role": "user", "content": "a"}]})])
    assert serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 request(s) give 'messages' or 'tools', which needs --chat" in err
    assert "r.jsonl:2" in err and "r.jsonl:3" in err and "r.jsonl:1" not in err


# -- train --chat ----------------------------------------------------------------------------

END = "<|im_end|>\n"
RENDERED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
EXAMPLES = [
    {"messages": [TOOL_TURN[0], TOOL_TURN[1]], "tools": [WEATHER]},  # the tool call learnt
    {"messages": [*TOOL_TURN, {"role": "assistant", "content": "21 degrees."}], "tools": [WEATHER]},
    {"prompt": "Weather?", "completion": "Which city?", "tools": [WEATHER]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
]
ANSWERS = [RENDERED_CALL, "21 degrees.", "Which city?", "hello"]


def _example_conversation(e):
    return e.get("messages") or [{"role": "user", "content": e["prompt"]},
                                 {"role": "assistant", "content": e["completion"]}]


def _write_objs(path, objs):
    return _write(path, [json.dumps(o) for o in objs])


@pytest.mark.hf
def test_train_rows_learn_the_rendered_tool_call_after_generate_chats_tokens(tmp_path):
    """Each row is apply_chat_template(conversation, tools=...); the labels are -100 exactly on
    what generate --chat feeds for the conversation less its answer (with the same tools), and
    the ids on the rest: for a tool call, the rendered <tool_call> and the end of turn."""
    from prefix_attn import train_chat
    from prefix_attn.chat import ChatTemplate
    from prefix_attn.serve_inputs import Request
    from test_serve_chat import chat_tokenizer

    tok = chat_tokenizer(TOOLS_TEMPLATE)
    rows = train_chat.ChatExamples(tok, "m").rows(train_chat.read_examples_at(_write_objs(tmp_path / "d.jsonl", EXAMPLES)))
    served = ChatTemplate(tok).request_ids(
        [Request(prompt=None, line=i, messages=_example_conversation(e)[:-1], tools=e.get("tools"))
         for i, e in enumerate(EXAMPLES)], None, "r")
    for i, (e, (_, (ids, labels))) in enumerate(zip(EXAMPLES, rows)):
        messages = _example_conversation(e)
        assert ids == tok.apply_chat_template(messages, tools=e.get("tools"), tokenize=True, return_dict=False)
        n = len(served[i])
        assert ids[:n] == served[i] and labels[:n] == [-100] * n and labels[n:] == ids[n:]
        assert tok.decode(labels[n:], skip_special_tokens=False) == ANSWERS[i] + END
        assert ("<tools>" in tok.decode(ids)) == ("tools" in e)


@pytest.mark.hf
def test_train_chat_with_tools_then_generate_chat_feeds_the_trained_context(tmp_path, folders, monkeypatch, capsys):
    """End to end: train --chat on examples with tools and a tool call, then generate --chat
    on the adapter with each conversation less its answer and its tools: model.generate is fed
    exactly the tokens the training rows held before the (labelled) answer."""
    from prefix_attn import serve, train
    from test_serve_chat import chat_tokenizer

    data, out = _write_objs(tmp_path / "d.jsonl", EXAMPLES), str(tmp_path / "run")
    model_dir = str(folders / "tools")
    seen, train_step = [], train.train_step

    def recording_step(model, opt, batch, *args, **kwargs):
        seen.extend(batch)
        return train_step(model, opt, batch, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_step)
    assert train.main([data, "-o", out, "--model", model_dir, "--chat", "--max-steps", "2", "--batch-size", "2",
                       "--max-length", "1000", "--eval-every", "0", "--num-virtual-tokens", "4", "--no-progress"]) == 0
    fed = record_generate(monkeypatch)
    requests = [{"prefix": "tuned", "messages": _example_conversation(e)[:-1], **({"tools": e["tools"]} if "tools" in e else {})}
                for e in EXAMPLES]
    assert serve.main(["-i", _write_objs(tmp_path / "r.jsonl", requests), "-o", str(tmp_path / "a.jsonl"),
                       "--model", model_dir, "--chat", "--adapter", f"tuned={out}/adapter", "--max-new-tokens", "2",
                       "--batch-size", "1", "--no-progress"]) == 0
    capsys.readouterr()
    tok = chat_tokenizer(TOOLS_TEMPLATE)
    contexts = []
    for ids, labels in seen:
        n = next(i for i, label in enumerate(labels) if label != -100)
        contexts.append(ids[:n])
        assert labels[n:] == ids[n:]
    assert len(seen) == len(EXAMPLES) and sorted(contexts) == sorted(fed)
    learnt = {tok.decode(ids[n:], skip_special_tokens=False)
              for (ids, _), n in zip(seen, map(len, contexts))}
    assert learnt == {a + END for a in ANSWERS}


@pytest.mark.parametrize("obj, pattern", [
    ({"messages": EXAMPLES[0]["messages"], "tools": {"a": 1}}, r"d.jsonl:1: 'tools' must be an array of objects .*got an object"),
    ({"prompt": "a", "completion": "b", "tools": [1]}, r"d.jsonl:1: 'tools' must be an array .*got an array holding a number"),
    ({"messages": [TOOL_TURN[0], {"role": "assistant", "content": None}]},
     r"d.jsonl:1: messages\[1\]: 'content' must be a string; got null \(null or left out only with"),
])
def test_bad_tool_examples_are_named(tmp_path, obj, pattern):
    from prefix_attn import train_chat
    from prefix_attn.train_state import TrainError

    with pytest.raises(TrainError, match=pattern):
        train_chat.read_examples_at(_write_objs(tmp_path / "d.jsonl", [obj]))


def test_tools_without_train_chat_are_refused_naming_the_line(tmp_path):
    from prefix_attn import train
    from prefix_attn.train_state import TrainError

    data = _write_objs(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                              {"prompt": "a", "completion": "b", "tools": [WEATHER]}])
    with pytest.raises(TrainError, match=r"d.jsonl:2: 'tools' needs --chat"):
        train.read_examples_at(data)


def test_readme_says_chat_takes_tools():
    import cli_docs

    command_line = " ".join(cli_docs.command_line().split())
    assert "A request may also give `\"tools\"` (null: none), an array of function schemas" in command_line
    assert "`apply_chat_template(..., tools=tools)`" in command_line and "`\"tool_calls\"`" in command_line
    assert "an answer that is a tool call (`\"content\": null`, `\"tool_calls\"`) learns the rendered call" in command_line
