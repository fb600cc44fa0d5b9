"""``generate --chat`` and ``train --chat`` across the chat templates of widely used model
families (tests/chat_templates.py: re-typed approximations, not the repositories' files).

For each family: (a) a ``--prompt-prefix`` (a shared system prompt) is served or refused; (b)
requests without a prefix are served; (c) ``train --chat`` rows of prompt/completion and
multi-turn examples are made or refused, and with ``--chat-turns all`` / ``each`` every
assistant turn's;
(d) with tools, where the template renders them; (e) requests continuing a prefilled answer
(``"continue_final_message"``) are rendered as transformers renders them, or refused.
Every answer served must equal ``model.generate`` on the whole templated conversation, and
every refusal must be right: the template really renders the system prompt (or the context of
an answer) otherwise. docs/CLI.md (generate --chat) shows these outcomes as a table.
"""
import json

import pytest
import torch

from chat_templates import FAMILIES, VOCAB_SIZE, family_tokenizer
from prefix_attn import serve, tiny, train_chat
from prefix_attn.chat import ChatTemplate
from prefix_attn.train_state import TrainError
from test_serve_chat import record_generate
from test_train_chat import _learnt_runs

pytestmark = pytest.mark.hf

SERVED = "served"
SPLIT = "not the conversation's start"  # [system] alone is not the first tokens of the conversation
RAISES = "the template refuses [system] alone"
NO_TOKENS = "[system] alone is no tokens"
NOT_ITS_TEXT = "[system] alone is the same tokens whatever its text"

# (a) a --prompt-prefix, requests without tools; (d) the same with "tools" (families rendering them)
PREFIX = {"qwen2.5": SERVED, "qwen3": SERVED, "smollm2": SERVED, "llama3": SERVED, "llama3.1": SERVED,
          "llama2": NO_TOKENS, "mistral-v0.1": RAISES, "mistral-v0.3": NOT_ITS_TEXT, "gemma2": RAISES,
          "gemma3": NOT_ITS_TEXT, "phi3": SERVED, "phi4": SERVED, "deepseek-v2": SERVED,
          "deepseek-v3": SERVED, "deepseek-r1": SERVED, "zephyr": SERVED}
PREFIX_WITH_TOOLS = {"qwen2.5": SPLIT, "qwen3": SPLIT, "llama3.1": SPLIT, "deepseek-v3": SERVED,
                     "deepseek-r1": SERVED}  # Mistral v0.3: refused as without tools
_MESSAGES = {SPLIT: "cannot be shared as a prefix with this chat template: it renders the system message "
                    "differently once a user turn follows",
             RAISES: "the chat template refuses a system message alone",
             NO_TOKENS: "the chat template renders a system message alone as no tokens",
             NOT_ITS_TEXT: "whatever its text (it writes the system message only with a user turn, folded into one)"}

# (c) train --chat, per example: "ok", or the refusal (TEMPLATE: the template refuses the
# conversation; CONTEXT: the context with the generation prompt is not the conversation's start)
OK, TEMPLATE, CONTEXT = "ok", "the template refuses it", "the context is not the conversation's start"
TRAIN_EXAMPLES = ("prompt/completion", "multi-turn", "multi-turn with a system message",
                  "tool call", "answer after a tool result")
TRAIN = {name: [OK, OK, OK] + ([OK, OK] if f.tools else []) for name, f in FAMILIES.items()}
TRAIN.update({"mistral-v0.1": [OK, OK, TEMPLATE], "gemma2": [OK, OK, TEMPLATE],
              "mistral-v0.3": [OK, OK, CONTEXT, OK, OK],
              "deepseek-r1": [CONTEXT, CONTEXT, CONTEXT, CONTEXT, OK]})

SYSTEM = "Be brief."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MULTI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
         {"role": "user", "content": "And now?"}]


def tool_turn(name):
    """A question, a tool call (id of 9 characters, as Mistral's template wants) and its result.
    DeepSeek's template concatenates the arguments (a JSON string here) and tests the call's
    content with `is none`, which transformers 5 hides by dropping null keys: "" there."""
    string = FAMILIES[name].string_arguments
    arguments = '{"city": "Paris"}' if string else {"city": "Paris"}
    call = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "" if string else None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call00001", "name": "get_weather", "content": '{"temp": 21}'}]


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama (2048 positions: tool preambles are long in bytes) saved with each
    family's tokenizer; and that model, loaded once, for the expected answers."""
    root = tmp_path_factory.mktemp("families")
    model = tiny.tiny_model("llama", vocab_size=VOCAB_SIZE, hidden=64, heads=4, kv_heads=2,
                            max_position_embeddings=2048, initializer_range=0.2)  # answers vary more
    for name in FAMILIES:
        model.save_pretrained(str(root / name))
        family_tokenizer(name).save_pretrained(str(root / name))
    return root, tiny.load_model_folder(str(root / next(iter(FAMILIES))))


def _render(tok, messages, tools=None, generation_prompt=True):
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                   tokenize=True, return_dict=False)


def _generate(folders, tmp_path, monkeypatch, name, requests, *options):
    """(exit status, answers or None) of generate --chat on ``requests``; the rows and prefixes
    model.generate was given (padding removed) are checked: after the prompt prefix, the
    system part's ids (the entry) and the row are the whole templated conversation's."""
    root, _ = folders
    fed = record_generate(monkeypatch, with_prefixes=True)
    out = tmp_path / f"{name}-answers.jsonl"
    rc = serve.main(["-i", _write(tmp_path / f"{name}.jsonl", requests), "-o", str(out), "--model",
                     str(root / name), "--chat", "--max-new-tokens", "5", "--batch-size", "3",
                     "--no-progress", *options])
    if rc != 0:
        return rc, None
    tok = family_tokenizer(name)
    head = ChatTemplate(tok).system_ids("sys", SYSTEM) if any("prefix" in r for r in requests) else None
    full = [_render(tok, _conversation(r), r.get("tools")) for r in requests]
    assert sorted((head if p == "sys" else []) + row for row, p in fed) == sorted(full)
    return rc, [json.loads(line) for line in open(out, encoding="utf-8")]


def _conversation(r):
    messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
    return ([{"role": "system", "content": SYSTEM}] if "prefix" in r else []) + messages


def _expected(folders, name, requests):
    """model.generate (greedy, no prefix machinery) on each request's whole templated
    conversation, its system message first after a prompt prefix; answers as generate writes them."""
    _, model = folders
    tok = family_tokenizer(name)
    stop = serve._stop_ids(model, tok)
    expected = []
    for r in requests:
        ids = _render(tok, _conversation(r), r.get("tools"))
        with torch.no_grad():
            new = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=stop)[0, len(ids):].tolist()
        new = new[:next((i for i, t in enumerate(new) if t in stop), len(new))]
        expected.append((tok.decode(new, skip_special_tokens=True), len(new)))
    return expected


def _assert_answers(answers, expected):
    assert [(a["completion"], a["num_tokens"]) for a in answers] == expected
    assert len(set(expected)) > 1  # the conversations differ in what they give


def _refusal_is_right(name, outcome, tools=None):
    """The template really renders a system prompt that cannot be a prefix: checked on the
    template itself, without prefix_attn."""
    tok = family_tokenizer(name)
    alone = [{"role": "system", "content": SYSTEM}]
    if outcome == RAISES:
        with pytest.raises(Exception):
            _render(tok, alone, generation_prompt=False)
        return
    ids = _render(tok, alone, generation_prompt=False)
    if outcome == NO_TOKENS:
        assert ids == []
    elif outcome == NOT_ITS_TEXT:
        assert ids == _render(tok, [{"role": "system", "content": "Something else."}], generation_prompt=False)
        assert SYSTEM not in tok.decode(ids)
    else:
        full = _render(tok, alone + [{"role": "user", "content": "q"}], tools)
        assert full[:len(ids)] != ids and full[:len(ids) - 1] != ids[:-1]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_shared_system_prompt(tmp_path, folders, capsys, monkeypatch, name):
    """(a) --prompt-prefix sys=SYSTEM, a prompt and a multi-turn request: served with the
    answers of model.generate on [system, *messages], or refused, naming the prefix, where the
    template really renders [system] alone otherwise."""
    requests = [{"prefix": "sys", "prompt": "What is 2+2?"}, {"prefix": "sys", "messages": MULTI},
                {"prefix": "sys", "prompt": "Tell me more."}]
    rc, answers = _generate(folders, tmp_path, monkeypatch, name, requests, "--prompt-prefix", f"sys={SYSTEM}")
    err = capsys.readouterr().err
    if PREFIX[name] == SERVED:
        assert rc == 0, err
        _assert_answers(answers, _expected(folders, name, requests))
        tok = family_tokenizer(name)
        head = ChatTemplate(tok).system_ids("sys", SYSTEM)
        assert SYSTEM in tok.decode(head)  # the entry holds the system prompt
    else:
        assert rc == 2 and "--prompt-prefix sys" in err and _MESSAGES[PREFIX[name]] in err, err
        _refusal_is_right(name, PREFIX[name])


@pytest.mark.parametrize("name", FAMILIES)
def test_requests_without_a_prefix(tmp_path, folders, monkeypatch, name):
    """(b) no prefix: a prompt (the template's default system prompt, if any, included) and a
    multi-turn request; (d) with tools, a tool call and its result, and a prompt with tools."""
    requests = [{"prompt": "What is 2+2?"}, {"messages": MULTI}]
    if FAMILIES[name].tools:
        requests += [{"messages": tool_turn(name), "tools": [WEATHER]}, {"prompt": "Weather in Oslo?", "tools": [WEATHER]}]
    rc, answers = _generate(folders, tmp_path, monkeypatch, name, requests)
    assert rc == 0
    _assert_answers(answers, _expected(folders, name, requests))


@pytest.mark.parametrize("name", PREFIX_WITH_TOOLS)
def test_a_shared_system_prompt_with_tools(tmp_path, folders, capsys, monkeypatch, name):
    """(d) a prompt prefix and requests giving tools: refused where the template writes the
    tools into the system part (Qwen, Llama 3.1), served where it leaves the schemas out."""
    requests = [{"prefix": "sys", "prompt": "Weather in Oslo?", "tools": [WEATHER]},
                {"prefix": "sys", "messages": tool_turn(name), "tools": [WEATHER]}]
    rc, answers = _generate(folders, tmp_path, monkeypatch, name, requests, "--prompt-prefix", f"sys={SYSTEM}")
    err = capsys.readouterr().err
    if PREFIX_WITH_TOOLS[name] == SERVED:
        assert rc == 0, err
        _assert_answers(answers, _expected(folders, name, requests))
    else:
        assert rc == 2 and "--prompt-prefix sys" in err and _MESSAGES[SPLIT] in err
        assert 'requests giving "tools"' in err
        _refusal_is_right(name, SPLIT, tools=[WEATHER])


def _examples(name):
    examples = [[{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
                MULTI + [{"role": "assistant", "content": "Now 5."}],
                [{"role": "system", "content": SYSTEM}] + MULTI + [{"role": "assistant", "content": "Now 5."}]]
    if FAMILIES[name].tools:
        turn = tool_turn(name)
        examples += [turn[:2], turn + [{"role": "assistant", "content": "21 degrees."}]]
    return examples


@pytest.mark.parametrize("name", FAMILIES)
def test_train_chat_rows(tmp_path, name):
    """(c) each example alone through train --chat's rows: made, the loss on the answer's turn
    after exactly what generate --chat feeds for the conversation less its answer, or refused
    where the template refuses the conversation or renders its context otherwise."""
    tok = family_tokenizer(name)
    examples = _examples(name)
    tools = [None, None, None, [WEATHER], [WEATHER]]
    data = tmp_path / "d.jsonl"
    read = train_chat.read_examples_at(_write(data, [{"messages": m, **({"tools": t} if t else {})}
                                                     for m, t in zip(examples, tools)]))
    outcomes = []
    for (where, messages, tools_given), example in zip(read, examples):
        try:
            ((_, (ids, labels)),) = train_chat.ChatExamples(tok, "m").rows([(where, messages, tools_given)])
        except TrainError as exc:
            if "cannot render" in str(exc):
                outcomes.append(TEMPLATE)
                with pytest.raises(Exception):
                    _render(tok, example, tools_given, generation_prompt=False)
            else:
                assert "is not the first tokens of the whole conversation" in str(exc)
                outcomes.append(CONTEXT)
                context = _render(tok, example[:-1], tools_given)
                assert _render(tok, example, tools_given, generation_prompt=False)[:len(context)] != context
            continue
        outcomes.append(OK)
        context = _render(tok, example[:-1], tools_given)
        assert ids == _render(tok, example, tools_given, generation_prompt=False)
        assert ids[:len(context)] == context and labels == [-100] * len(context) + ids[len(context):]
        learnt = tok.decode(ids[len(context):], skip_special_tokens=False)
        answer = example[-1]["content"] or "get_weather"
        assert answer in learnt and "What is 2+2?" not in learnt and "And now?" not in learnt
    assert outcomes == TRAIN[name], dict(zip(TRAIN_EXAMPLES, outcomes))


# (c) train --chat --chat-turns all: every assistant turn of a multi-turn example learnt, or the
# refusal (REWRITES: the conversation rendered up to an earlier turn is not the whole one's start)
REWRITES = "an earlier turn is rendered otherwise once later messages follow"
ALL_TURNS_EXAMPLES = ("2 turns", "3 turns", "3 turns with a system message", "a tool call, then the answer")
THREE = MULTI + [{"role": "assistant", "content": "Now 5."}, {"role": "user", "content": "Last?"},
                 {"role": "assistant", "content": "Yes."}]
ALL_TURNS = {name: [OK, OK, OK] + ([OK] if f.tools else []) for name, f in FAMILIES.items()}
ALL_TURNS.update({"qwen3": [REWRITES] * 4, "mistral-v0.1": [OK, OK, TEMPLATE], "gemma2": [OK, OK, TEMPLATE],
                  "mistral-v0.3": [OK, OK, CONTEXT, OK], "deepseek-r1": [CONTEXT, CONTEXT, CONTEXT, REWRITES]})


def _all_turns_examples(name):
    """(messages, tools) of ALL_TURNS_EXAMPLES."""
    examples = [(MULTI + [{"role": "assistant", "content": "Now 5."}], None), (THREE, None),
                ([{"role": "system", "content": SYSTEM}] + THREE, None)]
    if FAMILIES[name].tools:
        examples.append((tool_turn(name) + [{"role": "assistant", "content": "21 degrees."}], [WEATHER]))
    return examples


@pytest.mark.parametrize("name", FAMILIES)
def test_train_chat_rows_of_every_turn(name):
    """(c) --chat-turns all: one row per conversation, whose learnt tokens are exactly each
    assistant turn's, each after exactly what generate --chat feeds for the messages before it
    (the template rendering them with the generation prompt, compared token by token) and
    ending where the conversation rendered up to it ends (less the EOS that closes a
    conversation there, Phi-3's, which the whole one has not there); or refused where the
    template refuses the conversation, renders a context otherwise, or rewrites an earlier turn."""
    tok = family_tokenizer(name)
    eos = tok.eos_token_id
    outcomes = []
    for messages, tools in _all_turns_examples(name):
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        try:
            ((_, (ids, labels)),) = train_chat.ChatExamples(tok, "m", turns="all").rows([("d:1", messages, tools)])
        except TrainError as exc:
            if "cannot render" in str(exc):
                outcomes.append(TEMPLATE)
                with pytest.raises(Exception):
                    _render(tok, messages, tools, generation_prompt=False)
                continue
            full = _render(tok, messages, tools, generation_prompt=False)
            if "an earlier assistant turn is not in the whole conversation" in str(exc):
                outcomes.append(REWRITES)
                assert "Use --chat-turns each" in str(exc) and "d:1: messages[" in str(exc)
                j = int(str(exc).split("d:1: messages[")[1].split("]")[0])
                context, upto = _render(tok, messages[:j], tools), _render(tok, messages[:j + 1], tools, False)
                assert full[:len(context)] != context or (full[:len(upto)] != upto
                                                          and full[:len(upto) - 1] != upto[:-1])
            else:
                assert "is not the first tokens of the whole conversation" in str(exc)
                outcomes.append(CONTEXT)
                context = _render(tok, messages[:-1], tools)
                assert full[:len(context)] != context
            continue
        outcomes.append(OK)
        assert ids == _render(tok, messages, tools, generation_prompt=False)
        expected = []
        for j in turns:
            context = _render(tok, messages[:j], tools)
            assert ids[:len(context)] == context  # what generate --chat feeds for it
            upto = _render(tok, messages[:j + 1], tools, generation_prompt=False)
            if j != turns[-1] and ids[:len(upto)] != upto:
                assert upto[-1] == eos and ids[:len(upto) - 1] == upto[:-1]
                upto = upto[:-1]
            expected.append((len(context), len(upto)))
        assert _learnt_runs(labels) == expected and all(labels[i] == ids[i] for s, e in expected for i in range(s, e))
        for (start, end), j in zip(expected, turns):
            learnt = tok.decode(ids[start:end], skip_special_tokens=False)
            assert (messages[j]["content"] or "get_weather") in learnt
            assert not any(m["content"] and m["content"] in learnt for m in messages if m is not messages[j])
    assert outcomes == ALL_TURNS[name], dict(zip(ALL_TURNS_EXAMPLES, outcomes))


# (c) train --chat --chat-turns each: a row per assistant turn, the conversation ending with it,
# exactly last's row of that conversation (refused where last refuses one of them)
EACH_TURN = {**ALL_TURNS, "qwen3": [OK] * 4, "deepseek-r1": [CONTEXT] * 4}


@pytest.mark.parametrize("name", FAMILIES)
def test_train_chat_rows_of_each_turn(name):
    """(c) --chat-turns each: the rows of a conversation are last's rows of the conversations
    ending with each of its assistant turns (Qwen3's included, whose earlier turns all refuses);
    refused where last refuses one of them, the error naming it by turn."""
    tok = family_tokenizer(name)
    outcomes = []
    for messages, tools in _all_turns_examples(name):
        turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
        truncated = [(f"d:1: messages[{j}] (assistant turn {k + 1} of {len(turns)})", messages[:j + 1], tools)
                     for k, j in enumerate(turns)]
        try:
            rows = train_chat.ChatExamples(tok, "m", turns="each").rows([("d:1", messages, tools)])
        except TrainError as exc:
            lines = str(exc).splitlines()[1:]
            expected = []  # last's refusals of the truncated conversations, one at a time
            for example in truncated:
                try:
                    train_chat.ChatExamples(tok, "m").rows([example])
                except TrainError as last_exc:
                    expected += str(last_exc).splitlines()[1:]
            assert lines == expected and lines
            outcomes.append(TEMPLATE if "cannot render" in str(exc) else CONTEXT)
            continue
        outcomes.append(OK)
        assert rows == train_chat.ChatExamples(tok, "m").rows(truncated) and len(rows) == len(turns)
    assert outcomes == EACH_TURN[name], dict(zip(ALL_TURNS_EXAMPLES, outcomes))


def test_phi3s_earlier_turns_end_before_the_eos_that_closes_a_conversation():
    """Phi-3 ends a conversation rendered without the generation prompt with its EOS: an earlier
    turn is learnt up to its <|end|> (the EOS is not in the whole conversation there), the last
    turn with the EOS, as --chat-turns last learns it."""
    tok = family_tokenizer("phi3")
    ((_, (ids, labels)),) = train_chat.ChatExamples(tok, "m", turns="all").rows([("d:1", THREE, None)])
    learnt = [tok.decode(ids[s:e], skip_special_tokens=False) for s, e in _learnt_runs(labels)]
    assert learnt == ["Hello.<|end|>\n", "Now 5.<|end|>\n", "Yes.<|end|>\n<|endoftext|>"]


def test_qwen3s_and_phi3s_turns_under_each_are_learnt_as_the_last_turn():
    """--chat-turns each on Qwen3 (whose earlier turns all refuses: they lose their think block):
    every turn's row learns it after the empty <think> block, as the last turn; on Phi-3 every
    turn's row learns it with the EOS, as train --chat learns the last one."""
    learnt = {}
    for name in ("qwen3", "phi3"):
        tok = family_tokenizer(name)
        rows = train_chat.ChatExamples(tok, "m", turns="each").rows([("d:1", THREE, None)])
        learnt[name] = [tok.decode(ids[s:e], skip_special_tokens=False)
                        for _, (ids, labels) in rows for s, e in _learnt_runs(labels)]
    assert learnt["qwen3"] == [f"<think>\n\n</think>\n\n{a}<|im_end|>\n" for a in ("Hello.", "Now 5.", "Yes.")]
    assert learnt["phi3"] == [f"{a}<|end|>\n<|endoftext|>" for a in ("Hello.", "Now 5.", "Yes.")]


def test_deepseek_tool_calls_with_null_content_are_the_templates_error(tmp_path):
    """transformers 5 drops a message's null keys before rendering; DeepSeek-V3's template tests
    a tool call's content with `is none` and then concatenates the missing key: the template's
    error, named per request (give "content": "" there, which renders the same)."""
    turn = tool_turn("deepseek-v3")
    tok = family_tokenizer("deepseek-v3")
    null = [turn[0], {**turn[1], "content": None}, turn[2]]
    try:  # transformers 5.17 keeps the null key (the template renders it), 5.25 drops it
        rendered = _render(tok, null)
    except Exception as exc:
        assert "has no attribute 'content'" in str(exc)
    else:
        assert "<｜tool▁calls▁begin｜>" in tok.decode(rendered, skip_special_tokens=False)
    assert "<｜Assistant｜><｜tool▁calls▁begin｜>" in tok.decode(_render(tok, turn), skip_special_tokens=False)


def _with_arguments(turn, arguments):
    """``turn`` (tool_turn's) with its call's arguments ``arguments`` (copies)."""
    call = turn[1]["tool_calls"][0]
    return [turn[0], {**turn[1], "tool_calls": [{**call, "function": {**call["function"], "arguments": arguments}}]},
            turn[2]]


OBJECT_ARGUMENTS = ["qwen2.5", "qwen3", "llama3.1", "mistral-v0.3"]  # templates writing arguments | tojson


@pytest.mark.parametrize("name", OBJECT_ARGUMENTS)
def test_arguments_as_json_text_render_as_the_object(name):
    """OpenAI's tool_calls carry "arguments" as JSON text: a template writing the object with
    tojson (Qwen2.5's / Hermes', Llama 3.1's, Mistral's whole call) would write that text as a
    JSON string, the call encoded twice; generate --chat and train --chat render it as the object,
    exactly, and the messages given are left as they are. (Qwen3's template writes text as given
    itself: the same rendering either way.)"""
    tok = family_tokenizer(name)
    turn = tool_turn(name)
    as_text = _with_arguments(turn, json.dumps(turn[1]["tool_calls"][0]["function"]["arguments"]))
    given = json.loads(json.dumps(as_text))
    template = ChatTemplate(tok)
    assert template.render(as_text, True, [WEATHER]) == _render(tok, turn, [WEATHER])
    assert as_text == given
    if name != "qwen3":  # as given, the text would be written as a JSON string
        assert '"{\\"city\\": \\"Paris\\"}"' in tok.decode(_render(tok, as_text, [WEATHER]))
    answer = {"role": "assistant", "content": "21 degrees."}
    rows = [train_chat.ChatExamples(tok, "m").rows([("d:1", t + [answer], [WEATHER])]) for t in (as_text, turn)]
    assert rows[0] == rows[1]
    assert template.arguments_form is dict


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-r1"])
def test_deepseek_keeps_arguments_as_json_text_and_takes_objects(name):
    """DeepSeek-V3's template concatenates the arguments' text: JSON text is kept as given (the
    rendering as before), and an object, which it cannot concatenate, is given as its JSON text."""
    tok = family_tokenizer(name)
    turn = tool_turn(name)  # the arguments as JSON text
    template = ChatTemplate(tok)
    assert template.render(turn, True, [WEATHER]) == _render(tok, turn, [WEATHER])
    as_object = _with_arguments(turn, json.loads(turn[1]["tool_calls"][0]["function"]["arguments"]))
    with pytest.raises(TypeError):  # as given
        _render(tok, as_object, [WEATHER])
    assert template.render(as_object, True, [WEATHER]) == _render(tok, turn, [WEATHER])
    assert template.arguments_form is str


def test_the_arguments_probe_runs_once_and_only_for_tool_calls():
    """How a template writes arguments is found by rendering once per ChatTemplate, and not at
    all for conversations without a tool call; a template writing no call leaves them as given."""
    template = ChatTemplate(family_tokenizer("qwen2.5"))
    probes = []
    probe = template._probe_text
    template._probe_text = lambda arguments: probes.append(arguments) or probe(arguments)
    template.render(MULTI, True)
    assert probes == []
    turn = tool_turn("qwen2.5")
    as_text = _with_arguments(turn, '{"city": "Paris"}')
    template.render(as_text, True)
    template.render(as_text, False)
    assert len(probes) == 1
    smollm2 = ChatTemplate(family_tokenizer("smollm2"))
    assert smollm2.arguments_form is None and smollm2.taken(as_text) is as_text


def test_readme_has_the_families_table():
    """docs/CLI.md's table says what these tests measure, family by family."""
    import cli_docs

    readme = cli_docs.reference()  # docs/CLI.md, generate --chat
    table = readme[readme.index("| family (template) |"):]
    table = table[:table.index("\n\n")].splitlines()
    assert "tests/test_chat_families.py" in readme[readme.index("| family (template) |") - 800:]
    rows = {line.split("|")[1].split()[0]: [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert list(rows) == list(FAMILIES)
    for name, (prefix, tools, train, all_turns, each_turn, continued) in rows.items():
        first = CONTINUE[name][0]
        assert continued.startswith("ok" if first == OK else "refused") and \
            (("except" in continued) == (first == OK and set(CONTINUE[name]) != {OK})), name
        for column, outcomes in ((all_turns, ALL_TURNS[name]), (each_turn, EACH_TURN[name])):
            if set(outcomes) == {OK}:
                assert column.startswith("ok") and "except" not in column, name
            else:
                assert column.startswith("refused" if OK not in outcomes else "ok") and \
                    ("except" in column or OK not in outcomes), name
        assert prefix.startswith(SERVED if PREFIX[name] == SERVED else "refused"), name
        with_tools = PREFIX_WITH_TOOLS.get(name)
        assert tools.startswith({SERVED: SERVED, SPLIT: "refused", None: "no tools"}[with_tools]) \
            or (name == "mistral-v0.3" and tools == "refused as without tools"), name
        if OK not in TRAIN[name] or TRAIN[name].count(OK) == 1:
            assert train.startswith("refused except" if OK in TRAIN[name] else "refused"), name
        else:
            assert train.startswith("ok") and ("except" in train) == (set(TRAIN[name]) != {OK}), name


# (e) "continue_final_message": a prefilled answer, alone, after a system message, and opened with
# a think block; OK: the ids are apply_chat_template(continue_final_message=True)'s; TEMPLATE: the
# template refuses the conversation; OPENED: it writes it otherwise than it opens an answer
OPENED = "written otherwise than an answer is opened"
PREFILL = {"role": "assistant", "content": 'Sure: {"a": '}
CONTINUE_EXAMPLES = ([{"role": "user", "content": "JSON?"}, PREFILL],
                     [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "JSON?"}, PREFILL],
                     [{"role": "user", "content": "JSON?"}, {"role": "assistant", "content": "<think>\nHm"}])
CONTINUE = {name: [OK, OK, OK] for name in FAMILIES}
CONTINUE.update({"mistral-v0.1": [OK, TEMPLATE, OK], "gemma2": [OK, TEMPLATE, OK],
                 "mistral-v0.3": [OK, OPENED, OK], "deepseek-r1": [OPENED, OPENED, OK]})


@pytest.mark.parametrize("name", FAMILIES)
def test_continuing_a_prefilled_answer(tmp_path, name):
    """(e) each request continuing its last (assistant) message runs the template's rendering
    of it, or is refused where the template refuses the conversation or writes the messages
    before the answer otherwise than it opens a new one (checked on the template itself)."""
    from prefix_attn.serve import read_requests

    tok = family_tokenizer(name)
    for messages, outcome in zip(CONTINUE_EXAMPLES, CONTINUE[name]):
        requests = read_requests(_write(tmp_path / "r.jsonl", [{"messages": messages, "continue_final_message": True}]))
        continued = dict(tokenize=False, continue_final_message=True)
        if outcome == OK:
            ids = ChatTemplate(tok).request_ids(requests, None, "r.jsonl")[1]
            assert ids == tok.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
            # templates trimming the content (Llama 3, Mistral, Gemma) end without its last space
            assert tok.decode(ids).rstrip().endswith(messages[-1]["content"].rstrip())
            continue
        with pytest.raises(serve.RequestError) as caught:
            ChatTemplate(tok).request_ids(requests, None, "r.jsonl")
        if outcome == TEMPLATE:
            assert "the chat template refuses this conversation" in str(caught.value)
            with pytest.raises(Exception):
                tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        else:
            assert "otherwise than it opens a new answer" in str(caught.value)
            opened = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
            assert not tok.apply_chat_template(messages, **continued).startswith(opened)
