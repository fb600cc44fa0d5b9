"""``prefix-attn train --chat`` (prefix_attn.train_chat): examples rendered with the tokenizer's
chat template, the loss on the answer's turn only, its context exactly the tokens that
``prefix-attn generate --chat`` feeds the trained prefix."""
import json
import os

import pytest
import torch

from prefix_attn import serve, train, train_chat
from prefix_attn.train_state import TrainError
from test_serve_chat import CHATML, MERGING, NO_SYSTEM, _model, chat_tokenizer, record_generate

pytestmark = pytest.mark.hf

END = "<|im_end|>\n"  # what CHATML writes after an assistant message
SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "4"}]
EXAMPLES = [{"prompt": "What is the capital of France?", "completion": "Paris."},
            {"prompt": "Say hi", "completion": "hi there"},
            {"completion": "no prompt"},
            {"messages": SYSTEM_CHAT},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\n\nb"}]}]


def _conversation(example):
    if "messages" in example:
        return example["messages"]
    return [{"role": "user", "content": example.get("prompt", "")},
            {"role": "assistant", "content": example["completion"]}]


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_chat")
    model = _model()
    for name, template in (("chatml", CHATML), ("merging", MERGING), ("no_system", NO_SYSTEM), ("plain", None)):
        model.save_pretrained(str(root / name))
        chat_tokenizer(template).save_pretrained(str(root / name))
    return root


def _ids(tok, messages, generation_prompt):
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                   return_dict=False)


def test_rows_label_only_the_answer_turn_after_generate_chats_tokens(tmp_path, folders):
    """Each row is the whole templated conversation; its labels are -100 exactly on the tokens
    generate --chat feeds for the conversation less its answer (its own request_ids), and the
    ids elsewhere: the answer and the template's end of turn (earlier turns are context)."""
    from prefix_attn.chat import ChatTemplate
    from prefix_attn.serve_inputs import Request

    tok = chat_tokenizer()
    examples = train_chat.read_examples_at(_write(tmp_path / "d.jsonl", EXAMPLES))
    rows = train_chat.ChatExamples(tok, "m").rows(examples)
    served = ChatTemplate(tok).request_ids(
        [Request(prompt=None, line=i, messages=_conversation(e)[:-1]) for i, e in enumerate(EXAMPLES)], None, "r")
    assert len(rows) == len(EXAMPLES)
    for i, (example, (where, (ids, labels))) in enumerate(zip(EXAMPLES, rows)):
        assert where == f"{tmp_path / 'd.jsonl'}:{i + 1}"
        messages = _conversation(example)
        assert ids == _ids(tok, messages, False)
        n = len(served[i])
        assert ids[:n] == served[i] == _ids(tok, messages[:-1], True)
        assert labels[:n] == [-100] * n and labels[n:] == ids[n:]
        assert tok.decode(labels[n:], skip_special_tokens=False) == messages[-1]["content"] + END


def test_train_chat_then_generate_chat_feeds_the_trained_context(tmp_path, folders, monkeypatch, capsys):
    """End to end: train --chat a few steps, then generate --chat on the adapter with each
    example's conversation less its answer: the ids fed to model.generate are exactly the
    tokens the training batches held before the answer, all labelled -100, and only the
    answer's turn is labelled."""
    data = _write(tmp_path / "d.jsonl", EXAMPLES)
    model_dir, out = str(folders / "chatml"), str(tmp_path / "run")
    seen = []  # the batches of rows the training steps ran on
    train_step = train.train_step

    def recording_step(model, opt, batch, *args, **kwargs):
        seen.extend(batch)
        return train_step(model, opt, batch, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_step)
    assert train.main([data, "-o", out, "--model", model_dir, "--chat", "--max-steps", "3", "--batch-size", "2",
                       "--eval-every", "0", "--num-virtual-tokens", "4", "--no-progress"]) == 0
    capsys.readouterr()
    fed = record_generate(monkeypatch)  # the rows model.generate got, padding removed
    requests = [{"prefix": "tuned", "messages": _conversation(e)[:-1]} for e in EXAMPLES]
    answers = tmp_path / "answers.jsonl"
    assert serve.main(["-i", _write(tmp_path / "r.jsonl", requests), "-o", str(answers), "--model", model_dir,
                       "--chat", "--adapter", f"tuned={out}/adapter", "--max-new-tokens", "2",
                       "--batch-size", "1", "--no-progress"]) == 0
    assert len(fed) == len(EXAMPLES)

    tok = chat_tokenizer()
    trained = {tuple(ids): labels for ids, labels in seen}
    assert len(trained) == len(EXAMPLES)  # 3 steps of 2 rows: every example seen
    contexts = []
    for example in EXAMPLES:
        messages = _conversation(example)
        ids = _ids(tok, messages, False)
        labels = trained[tuple(ids)]
        n = next(i for i, label in enumerate(labels) if label != -100)
        contexts.append(ids[:n])
        assert labels[n:] == ids[n:]
        assert tok.decode(ids[n:], skip_special_tokens=False) == messages[-1]["content"] + END
    # the token-level check (generate runs the longest first: compared as sorted lists)
    assert len(set(map(tuple, contexts))) == len(EXAMPLES) and sorted(contexts) == sorted(fed)


def test_text_examples_are_refused_naming_their_lines(tmp_path, folders, capsys):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "raw"},
                                         {"completion": "c"}, {"text": "raw too"}])
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), "--model", str(folders / "chatml"), "--chat", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "2 example(s) give 'text'" in err
    assert f"{data}:2" in err and f"{data}:4" in err and f"{data}:1" not in err
    assert not out.exists()


def test_a_plain_text_file_is_refused(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one raw example\n")
    with pytest.raises(TrainError, match=r"d.txt: --chat reads .jsonl / .json examples .* no turns to render"):
        train_chat.read_examples_at(str(path))


@pytest.mark.parametrize("model", [None, "plain"])
def test_a_tokenizer_without_a_chat_template_is_one_error_before_the_model_loads(
        tmp_path, folders, capsys, monkeypatch, model):
    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(train, "load_model", fail)
    data = _write(tmp_path / "d.jsonl", EXAMPLES)
    where = [] if model is None else ["--model", str(folders / model)]
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), "--chat", "--no-progress", *where]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--chat:" in err and "has no chat template" in err
    assert ("byte tokenizer" in err) if model is None else (str(folders / model) in err)
    assert not out.exists()


def test_a_template_whose_generation_prompt_does_not_start_the_answer_is_refused(tmp_path, folders, capsys):
    """MERGING renders an assistant turn as '\\nassistant: ...' but its generation prompt is
    'assistant:': the context generate feeds is not the trained one; every example named."""
    data = _write(tmp_path / "d.jsonl", EXAMPLES[:2])
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), "--model", str(folders / "merging"), "--chat", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "for 2 example(s) the chat template's rendering" in err
    assert "generation prompt is not how it starts an assistant turn" in err
    assert f"{data}:1: from token " in err and f"{data}:2: from token " in err
    assert not out.exists()


def test_an_answer_merging_with_the_generation_prompt_is_refused_naming_it(tmp_path):
    """CHATML's generation prompt ends in a newline; an answer starting with one merges with it
    into one token ("\\n\\n"): same text, other tokens."""
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "fine"},
                                         {"prompt": "b", "completion": "\nmerges"}])
    with pytest.raises(TrainError) as exc:
        train_chat.ChatExamples(chat_tokenizer()).rows(train_chat.read_examples_at(data))
    assert "for 1 example(s)" in str(exc.value) and f"{data}:2: from token" in str(exc.value)
    assert f"{data}:1" not in str(exc.value)


def test_a_conversation_the_template_refuses_is_named(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"messages": SYSTEM_CHAT}])
    with pytest.raises(TrainError, match=r"1 example\(s\) that the chat template cannot render:\n  .*d.jsonl:2: "
                                         r".*System role not supported"):
        train_chat.ChatExamples(chat_tokenizer(NO_SYSTEM)).rows(train_chat.read_examples_at(data))


@pytest.mark.parametrize("obj, pattern", [
    ({"messages": [{"role": "user", "content": "q"}]}, r"d.jsonl:1: the last message's role is 'user': end with the assistant"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, r"d.jsonl:1: the last .* must follow a user or tool message.* only message"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
     r"d.jsonl:1: the last .*follows a 'system' message"),
    ({"messages": [{"role": "bot", "content": "a"}]}, r"d.jsonl:1: messages\[0\]: 'role' must be one of"),
    ({"messages": [{"role": "user", "content": 1}, {"role": "assistant", "content": "a"}]},
     r"d.jsonl:1: messages\[0\]: 'content' must be a string"),
    ({"messages": [], "completion": "a"}, r"d.jsonl:1: give either 'messages' or 'prompt'/'completion'"),
    ({"prompt": "a"}, r"d.jsonl:1: expected 'completion' .* or 'messages' under --chat; fields found: 'prompt'"),
    ({"prompt": 3, "completion": "a"}, r"d.jsonl:1: field 'prompt' must be a string"),
    (["x"], r"d.jsonl:1: expected a JSON object, got an array"),
])
def test_bad_examples_are_named(tmp_path, obj, pattern):
    with pytest.raises(TrainError, match=pattern):
        train_chat.read_examples_at(_write(tmp_path / "d.jsonl", [obj]))


def test_blank_examples_are_dropped_with_the_warning(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "", "completion": " "}, {"prompt": "a", "completion": "b"}])
    rows = train.prepare(chat_tokenizer(), train_chat.read_examples_at(data), 256, 262, data,
                         chat=train_chat.ChatExamples(chat_tokenizer()))
    assert len(rows) == 1 and "1 of 2 examples has no token to learn: 1 is empty" in capsys.readouterr().err


def test_messages_without_chat_are_refused_naming_the_line(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"messages": SYSTEM_CHAT}])
    with pytest.raises(TrainError, match=r"d.jsonl:2: 'messages' needs --chat"):
        train.read_examples_at(data)


@pytest.mark.parametrize("first, then", [(["--chat"], []), ([], ["--chat"])])
def test_resume_refuses_another_chat(tmp_path, folders, capsys, first, then):
    """The checkpoint records --chat: the same data tokenised otherwise is another run."""
    data = _write(tmp_path / "d.jsonl", EXAMPLES[:3])
    out = str(tmp_path / "run")
    common = [data, "-o", out, "--model", str(folders / "chatml"), "--batch-size", "2", "--eval-every", "0",
              "--num-virtual-tokens", "4", "--no-progress"]
    assert train.main([*common, "--max-steps", "1", *first]) == 0
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["settings"]["--chat"] is bool(first)
    capsys.readouterr()
    assert train.main([*common, "--max-steps", "2", "--resume", *then]) == 2
    err = capsys.readouterr().err
    assert "--resume with other settings" in err and f"--chat: {bool(first)} -> {bool(then)}" in err
    assert train.main([*common, "--max-steps", "2", "--resume", *first]) == 0


def test_a_checkpoint_from_before_chat_resumes_only_without_it():
    """Older checkpoints record no --chat: they were trained on raw text."""
    from prefix_attn.train_state import check_same_settings

    state = {"settings": {"--seed": 0}}
    check_same_settings(state, {"--seed": 0, "--chat": False}, "c.pt")
    with pytest.raises(TrainError, match=r"--chat: False -> True"):
        check_same_settings(state, {"--seed": 0, "--chat": True}, "c.pt")


def test_a_checkpoint_from_before_dtype_resumes_only_in_float32():
    """--dtype came after the stored settings: an older checkpoint trained a float32 base, and
    its resume with --dtype bfloat16 was not refused."""
    from prefix_attn.train_state import check_same_settings

    state = {"settings": {"--seed": 0}}
    check_same_settings(state, {"--seed": 0, "--dtype": "float32"}, "c.pt")
    with pytest.raises(TrainError, match=r"--dtype: float32 -> bfloat16"):
        check_same_settings(state, {"--seed": 0, "--dtype": "bfloat16"}, "c.pt")


def test_readme_and_help_say_what_train_chat_does():
    import cli_docs

    command_line = cli_docs.command_line()
    assert "prefix-attn train chat.jsonl -o out/ --model DIR --chat" in command_line
    assert "`prefix-attn train --chat` trains a prefix for `generate --chat`" in command_line
    assert "lr, weight decay, `--chat`, `--chat-option` or `--chat-turns` differ" in command_line
    assert "`--chat-turns all` learns every assistant turn" in command_line
    description = " ".join(train.build_parser().format_help().split())  # __doc__, as --help shows it
    assert "--chat`` trains a prefix for ``prefix-attn generate --chat``" in description
    assert "``--chat-turns all`` learns every assistant turn of a conversation" in description
    assert "`--chat-turns each` learns every assistant turn too, each in a row of its own" in command_line
    assert "``--chat-turns each`` learns every assistant turn too, each in a row of its own" in description
    assert "or each (every one, in a row of its own" in description  # the option's help


# -- added by the mutation audit ------------------------------------------------------------

def test_many_text_examples_are_listed_ten_then_counted(tmp_path):
    """Ten examples named, the rest counted; exactly ten: no "and 0 more"."""
    def error(n):
        data = _write(tmp_path / f"d{n}.jsonl", [{"text": "raw"}] * n)
        with pytest.raises(TrainError) as exc:
            train_chat.read_examples_at(data)
        return data, str(exc.value).splitlines()
    data, lines = error(12)
    assert lines[0].startswith("12 example(s) give 'text'")
    assert lines[1:] == [f"  {data}:{i}" for i in range(1, 11)] + ["  and 2 more"]
    data, lines = error(10)
    assert lines[1:] == [f"  {data}:{i}" for i in range(1, 11)]


def test_an_empty_data_file_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(TrainError, match=r"d.jsonl: no examples \(the file is empty or has only blank lines\)"):
        train_chat.read_examples_at(str(path))


def test_a_completion_that_is_not_a_string_is_named(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": ["b"]}])
    with pytest.raises(TrainError, match=r"d.jsonl:1: field 'completion' must be a string, got an array"):
        train_chat.read_examples_at(data)


@pytest.mark.parametrize("messages, pattern", [
    ([{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "call"},
      {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}], None),
    ([{"role": "user", "content": "weather?"}, {"role": "tool", "content": "sunny"}],
     r"d.jsonl:1: the last message's role is 'tool': end with the assistant message"),
])
def test_an_answer_after_a_tool_message_is_learnt_and_a_tool_message_last_is_not(tmp_path, messages, pattern):
    data = _write(tmp_path / "d.jsonl", [{"messages": messages}])
    if pattern is None:
        assert train_chat.read_examples_at(data) == [(f"{data}:1", messages, None)]  # (where, messages, tools)
    else:
        with pytest.raises(TrainError, match=pattern):
            train_chat.read_examples_at(data)


# renders no assistant message: with a generation prompt, the context is longer than the
# conversation; without one, the answer is no tokens
DROPS_ANSWERS = ("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                 "{% endif %}{% endfor %}")


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_a_template_that_leaves_the_answer_out_is_refused_saying_why(tmp_path, generation_prompt):
    template = DROPS_ANSWERS + ("{% if add_generation_prompt %}{{ 'bot:' }}{% endif %}"
                                if generation_prompt else "")
    data = _write(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(TrainError) as exc:
        train_chat.ChatExamples(chat_tokenizer(template)).rows(train_chat.read_examples_at(data))
    if generation_prompt:  # "user: q\n" is 8 tokens: the context's differ from token 8 on
        assert f"{data}:1: from token 8, 'bot:' with the generation prompt but '' in the " \
               "conversation" in str(exc.value)
    else:
        assert f"{data}:1: the chat template renders the answer as no tokens" in str(exc.value)


def test_an_answer_merging_with_the_generation_prompt_shows_the_tokens_from_the_difference(tmp_path):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "b", "completion": "\nmerges"}])
    with pytest.raises(TrainError) as exc:
        train_chat.ChatExamples(chat_tokenizer()).rows(train_chat.read_examples_at(data))
    assert "'\\n' with the generation prompt but '\\n\\nmerges<|im_end|>' in the conversation" in str(exc.value)


def test_eval_data_is_rendered_with_the_chat_template_too(tmp_path, folders):
    """--eval-data under --chat: its examples are conversations as the training data's are."""
    data = _write(tmp_path / "d.jsonl", EXAMPLES)
    evals = _write(tmp_path / "e.jsonl", [{"messages": SYSTEM_CHAT}, {"prompt": "Say hi", "completion": "hi"}])
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), "--model", str(folders / "chatml"), "--chat", "--eval-data", evals,
                       "--max-steps", "1", "--eval-every", "1", "--num-virtual-tokens", "4", "--no-progress"]) == 0
    assert os.path.isdir(out / "adapter")


# -- added by the chat-template families audit ------------------------------------------------

# Mistral-v0.3-like: the system message written into the last message only while it is a user
# turn, so a conversation ending in its answer has none
SYSTEM_IN_LAST_USER = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
                       "{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
                       "{% for m in rest %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
                       "{% if loop.last and sys is defined %}{{ sys + '\n\n' }}{% endif %}{{ m['content'] + '[/INST]' }}"
                       "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")


def test_a_template_rendering_earlier_messages_otherwise_once_an_answer_follows_is_named_as_such():
    """The refusal named two causes, neither of them this one: a template that drops the system
    message once the answer follows (Mistral v0.3). The example's line shows where."""
    tok = chat_tokenizer(SYSTEM_IN_LAST_USER)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello."}]
    with pytest.raises(TrainError) as exc:
        train_chat.ChatExamples(tok).rows([("d.jsonl:1", messages, None)])
    headline, line = str(exc.value).splitlines()
    assert "or the template renders the earlier messages otherwise once an answer follows" in headline
    assert line == "  d.jsonl:1: from token 8, 'Be brief' with the generation prompt but 'hi[/INST' in the conversation"
    assert train_chat.ChatExamples(tok).rows([("d.jsonl:1", messages[1:], None)])[0][1] is not None


# -- --chat-turns all: every assistant turn learnt ---------------------------------------------

TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
THREE_TURNS = SYSTEM_CHAT + [{"role": "user", "content": "and 3+3?"}, {"role": "assistant", "content": "six"}]
# ChatML, but the last assistant turn written with a think block, earlier ones without (Qwen3)
THINKS_LAST = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
               "{% if m['role'] == 'assistant' and loop.last %}{{ '<think></think>' }}{% endif %}"
               "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _learnt_runs(labels):
    """[start, end) of each run of learnt labels."""
    runs = []
    for i, label in enumerate(labels):
        if label != -100:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    return runs


def _turns(messages):
    return [j for j, m in enumerate(messages) if m["role"] == "assistant"]


def test_all_turns_label_every_assistant_turn_after_generate_chats_tokens(tmp_path):
    """--chat-turns all: one row per conversation (the same ids as with last); each assistant
    turn learnt, with its end of turn, after exactly the tokens generate --chat feeds for the
    messages before it (its own request_ids); the rest -100. last: the last turn only."""
    from prefix_attn.chat import ChatTemplate
    from prefix_attn.serve_inputs import Request

    tok = chat_tokenizer()
    conversations = [TWO_TURNS, THREE_TURNS]
    examples = train_chat.read_examples_at(_write(tmp_path / "d.jsonl", [{"messages": m} for m in conversations]))
    every = train_chat.ChatExamples(tok, "m", turns="all").rows(examples)
    last = train_chat.ChatExamples(tok, "m").rows(examples)
    for messages, (_, (ids, labels)), (_, (last_ids, last_labels)) in zip(conversations, every, last):
        assert ids == last_ids == _ids(tok, messages, False)
        served = ChatTemplate(tok).request_ids(
            [Request(prompt=None, line=j, messages=messages[:j]) for j in _turns(messages)], None, "r")
        runs = _learnt_runs(labels)
        assert [start for start, _ in runs] == [len(served[j]) for j in _turns(messages)]
        for (start, end), j in zip(runs, _turns(messages)):
            assert ids[:start] == served[j]
            assert labels[start:end] == ids[start:end]
            assert tok.decode(ids[start:end], skip_special_tokens=False) == messages[j]["content"] + END
        assert _learnt_runs(last_labels) == runs[-1:]


@pytest.mark.parametrize("pack", [False, True])
def test_the_loss_trained_on_is_the_token_weighted_mean_over_every_turn(pack):
    """train_step's loss on --chat-turns all rows of a 2- and a 3-turn conversation is the
    mean, over every learnt token of both (not per turn, not per row), of -log p(token | the
    conversation before it), computed here row by row from the template alone."""
    from prefix_attn.tuning import prefix_tuning

    tok = chat_tokenizer()
    conversations = [TWO_TURNS, THREE_TURNS]
    rows = [row for _, row in train_chat.ChatExamples(tok, turns="all").rows(
        [(f"d:{i}", m, None) for i, m in enumerate(conversations)])]
    torch.manual_seed(0)
    model = _model()
    module = prefix_tuning(model, num_virtual_tokens=4, name="p")
    loss, _, _ = train.train_step(model, torch.optim.SGD(module.parameters(), lr=0.0), rows, 0, "p", pack)
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            ids = _ids(tok, messages, False)
            positions = [p for j in _turns(messages)
                         for p in range(len(_ids(tok, messages[:j], True)), len(_ids(tok, messages[:j + 1], False)))]
            logp = torch.log_softmax(model(torch.tensor([ids]), prefixes=["p"]).logits[0].float(), -1)
            total -= sum(logp[p - 1, ids[p]].item() for p in positions)
            count += len(positions)
    # every turn: its bytes, then <|im_end|> and "\n"
    assert count == sum(len(m["content"]) + 2 for c in conversations for m in c if m["role"] == "assistant")
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_a_template_rewriting_earlier_turns_is_refused_naming_the_line_and_turn(tmp_path, folders, capsys):
    """THINKS_LAST writes a think block into the last assistant turn only: the conversation
    ending with the first turn (what generate --chat answers) is not the whole one's start.
    One error naming each example and turn, with the ways out; nothing written; last and each train."""
    tok = chat_tokenizer(THINKS_LAST)
    model_dir = tmp_path / "thinks_last"
    _model().save_pretrained(str(model_dir))
    tok.save_pretrained(str(model_dir))
    data = _write(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}, {"messages": TWO_TURNS},
                                         {"messages": THREE_TURNS}])
    out = tmp_path / "run"
    common = [data, "-o", str(out), "--model", str(model_dir), "--chat", "--max-steps", "1", "--eval-every", "0",
              "--num-virtual-tokens", "4", "--no-progress"]
    assert train.main([*common, "--chat-turns", "all"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--chat-turns all: in 2 example(s) an earlier assistant turn" in err
    assert "Use --chat-turns each (every turn learnt in a row of its own" in err and "or --chat-turns last" in err
    assert f"{data}:2: messages[1] (assistant turn 1 of 2): the conversation ending with it" in err
    assert f"{data}:3: messages[2] (assistant turn 1 of 3): the conversation ending with it" in err
    assert "differs from the whole conversation from token 40: '<think><' but 'Hello.<|im_end|>" in err
    assert f"{data}:1" not in err and not out.exists()
    assert train.main(common) == 0
    assert train.main([*common[:2], str(tmp_path / "each"), *common[3:], "--chat-turns", "each"]) == 0


def test_an_assistant_turn_that_answers_no_user_or_tool_message_is_refused_under_all(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                {"role": "assistant", "content": "Anyone?"}, {"role": "user", "content": "yes"},
                {"role": "assistant", "content": "Good."}]
    data = _write(tmp_path / "d.jsonl", [{"messages": messages}])
    examples = train_chat.read_examples_at(data)
    with pytest.raises(TrainError, match=r"d.jsonl:1: messages\[2\]: --chat-turns all learns every assistant "
                                         r"message as an answer to a user or tool message.*follows a 'assistant'"):
        train_chat.ChatExamples(chat_tokenizer(), turns="all").rows(examples)
    assert train_chat.ChatExamples(chat_tokenizer()).rows(examples)[0][1] is not None  # last: context


def test_chat_turns_needs_chat(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}])
    out = tmp_path / "run"
    assert train.main([data, "-o", str(out), "--chat-turns", "all", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--chat-turns all: chooses the assistant turns learnt under --chat" in err
    assert not out.exists()


def test_resume_refuses_other_chat_turns_and_older_checkpoints_count_as_last(tmp_path, folders, capsys):
    """The checkpoint records --chat-turns; one from before it trained the last turn only."""
    from prefix_attn.train_state import check_same_settings

    data = _write(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}, {"messages": THREE_TURNS}])
    out = str(tmp_path / "run")
    common = [data, "-o", out, "--model", str(folders / "chatml"), "--chat", "--eval-every", "0",
              "--num-virtual-tokens", "4", "--no-progress"]
    assert train.main([*common, "--max-steps", "1", "--chat-turns", "all"]) == 0
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["settings"]["--chat-turns"] == "all"
    capsys.readouterr()
    assert train.main([*common, "--max-steps", "2", "--resume"]) == 2
    assert "--chat-turns: all -> last" in capsys.readouterr().err
    assert train.main([*common, "--max-steps", "2", "--resume", "--chat-turns", "all"]) == 0
    state = {"settings": {"--seed": 0}}
    check_same_settings(state, {"--seed": 0, "--chat-turns": "last"}, "c.pt")
    with pytest.raises(TrainError, match=r"--chat-turns: last -> all"):
        check_same_settings(state, {"--seed": 0, "--chat-turns": "all"}, "c.pt")


def test_a_cut_keeps_the_turns_before_it_and_says_later_turns_are_not_learnt(tmp_path, capsys):
    """--max-length cuts the row as under last: the turns before the cut are learnt whole, the
    turn it cuts up to the cut, later ones not; the note says so."""
    tok = chat_tokenizer()
    data = _write(tmp_path / "d.jsonl", [{"messages": THREE_TURNS}])
    chat = train_chat.ChatExamples(tok, turns="all")
    ((ids, labels),) = train.prepare(tok, train_chat.read_examples_at(data), 256, 262, data, chat=chat)
    cut = len(_ids(tok, THREE_TURNS[:4], True)) + 2  # two tokens into the second turn
    ((cut_ids, cut_labels),) = train.prepare(tok, train_chat.read_examples_at(data), cut, 262, data, chat=chat)
    assert cut_ids == ids[:cut] and cut_labels == labels[:cut]
    assert _learnt_runs(cut_labels) == _learnt_runs(labels)[:1] + [(_learnt_runs(labels)[1][0], cut)]
    assert "cut, so its last tokens to learn (the assistant turns after the cut, and the end of the turn it " \
           "cuts, its end-of-turn token included) are not learnt" in capsys.readouterr().err


# -- --chat-turns each: every assistant turn learnt, in a row of its own ---------------------

def _truncations(where, messages):
    """[(where naming turn K of N, messages up to it)]: what each makes rows of."""
    turns = _turns(messages)
    return [(f"{where}: messages[{j}] (assistant turn {k + 1} of {len(turns)})", messages[:j + 1])
            for k, j in enumerate(turns)]


@pytest.mark.parametrize("template", [CHATML, THINKS_LAST])
def test_each_makes_a_row_per_turn_equal_to_lasts_row_of_the_conversation_ending_with_it(tmp_path, template):
    """--chat-turns each: a row per assistant turn J, where it names the line and turn, equal to
    the row last makes of messages[:J + 1]; sound where all is refused (THINKS_LAST rewrites
    earlier turns: each row renders its turn as the last one, with its think block)."""
    tok = chat_tokenizer(template)
    conversations = [TWO_TURNS, THREE_TURNS, EXAMPLES[4]["messages"]]
    data = _write(tmp_path / "d.jsonl", [{"messages": m} for m in conversations])
    each = train_chat.ChatExamples(tok, turns="each").rows(train_chat.read_examples_at(data))
    truncated = [t for i, m in enumerate(conversations) for t in _truncations(f"{data}:{i + 1}", m)]
    last = train_chat.ChatExamples(tok).rows([(where, m, None) for where, m in truncated])
    assert len(each) == 2 + 3 + 1 and each == last
    assert [where for where, _ in each][:2] == [f"{data}:1: messages[1] (assistant turn 1 of 2)",
                                                f"{data}:1: messages[3] (assistant turn 2 of 2)"]
    for (_, (ids, labels)), (_, messages) in zip(each, truncated):
        (run,) = _learnt_runs(labels)  # one turn learnt a row, the last, after generate's context
        assert ids == _ids(tok, messages, False) and run == (len(_ids(tok, messages[:-1], True)), len(ids))
    if template == THINKS_LAST:
        with pytest.raises(TrainError, match="Use --chat-turns each"):
            train_chat.ChatExamples(tok, turns="all").rows(train_chat.read_examples_at(data))


def test_each_names_the_line_and_turn_of_every_row_refused(tmp_path):
    """The checks last makes, per row: an answer merging with the generation prompt (the first
    turn's: the later rows hold it as context, fine), a conversation the template refuses (every
    turn's row, named), an assistant message answering no user or tool message."""
    merging = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\nmerges"},
               {"role": "user", "content": "b"}, {"role": "assistant", "content": "fine"}]
    with pytest.raises(TrainError) as exc:
        train_chat.ChatExamples(chat_tokenizer(), turns="each").rows([("d.jsonl:1", merging, None)])
    headline, line = str(exc.value).splitlines()
    assert headline.startswith("--chat: for 1 assistant turn(s) the chat template's rendering")
    assert line.startswith("  d.jsonl:1: messages[1] (assistant turn 1 of 2): from token ")
    with pytest.raises(TrainError) as exc:
        train_chat.ChatExamples(chat_tokenizer(NO_SYSTEM), turns="each").rows([("d.jsonl:2", SYSTEM_CHAT, None)])
    assert str(exc.value).splitlines() == [
        "--chat: 2 assistant turn(s) that the chat template cannot render:",
        "  d.jsonl:2: messages[2] (assistant turn 1 of 2): the chat template refuses this conversation "
        "(TemplateError: System role not supported)",
        "  d.jsonl:2: messages[4] (assistant turn 2 of 2): the chat template refuses this conversation "
        "(TemplateError: System role not supported)"]
    unanswered = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "assistant", "content": "Anyone?"}, {"role": "user", "content": "yes"},
                  {"role": "assistant", "content": "Good."}]
    with pytest.raises(TrainError, match=r"d.jsonl:3: messages\[2\]: --chat-turns each learns every assistant "
                                         r"message as an answer to a user or tool message.*follows a 'assistant'"):
        train_chat.ChatExamples(chat_tokenizer(), turns="each").rows([("d.jsonl:3", unanswered, None)])


def test_each_counts_rows_in_the_notes_of_cut_and_dropped_rows(tmp_path, capsys):
    """An example of 3 turns is 3 rows: a --max-length inside the second turn's context drops the
    third turn's row, cuts the second's and keeps the first's; the messages count rows, not
    examples (2 examples, 4 rows). No row left: the error counts rows too."""
    tok = chat_tokenizer()
    data = _write(tmp_path / "d.jsonl", [{"messages": THREE_TURNS}, {"prompt": "q", "completion": "a"}])
    chat = train_chat.ChatExamples(tok, turns="each")
    cut = len(_ids(tok, THREE_TURNS[:4], True)) + 2  # two tokens into the second turn
    rows = train.prepare(tok, train_chat.read_examples_at(data), cut, 262, data, chat=chat)
    assert len(rows) == 3 and all(len(ids) <= cut for ids, _ in rows)
    err = capsys.readouterr().err
    assert f"{data}: 1 of 4 rows (--chat-turns each: one per assistant turn of the 2 examples) is longer than " \
           f"the {cut}-token limit per row (--max-length): cut, so its last tokens to learn (the end-of-text " \
           "or end-of-turn token" in err
    assert f"{data}: 1 of 4 rows (--chat-turns each: one per assistant turn of the 2 examples) has no token " \
           "to learn: in 1 the prompt fills" in err
    with pytest.raises(TrainError, match=r"2 of 2 rows \(--chat-turns each: one per assistant turn of the 1 "
                                         r"example\) have no token to learn: 2 are empty .*; no row of the data file"):
        blank = _write(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": " "},
                                                            {"role": "assistant", "content": ""},
                                                            {"role": "user", "content": ""},
                                                            {"role": "assistant", "content": " "}]}])
        train.prepare(tok, train_chat.read_examples_at(blank), 256, 262, blank, chat=chat)


def test_each_trains_batches_drawn_over_rows_and_resume_refuses_another_setting(tmp_path, folders, monkeypatch,
                                                                             capsys):
    """End to end: 2 conversations (2 and 3 turns) are 5 rows, so an epoch of --batch-size 2 is
    3 steps, every row seen once; the checkpoint records each, --resume refuses last or all."""
    data = _write(tmp_path / "d.jsonl", [{"messages": TWO_TURNS}, {"messages": THREE_TURNS}])
    out = str(tmp_path / "run")
    seen = []
    train_step = train.train_step

    def recording_step(model, opt, batch, *args, **kwargs):
        seen.append(batch)
        return train_step(model, opt, batch, *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_step)
    common = [data, "-o", out, "--model", str(folders / "chatml"), "--chat", "--batch-size", "2",
              "--eval-every", "0", "--num-virtual-tokens", "4", "--no-progress"]
    assert train.main([*common, "--chat-turns", "each"]) == 0
    tok = chat_tokenizer()
    expected = [_ids(tok, m, False) for _, m in _truncations("d", TWO_TURNS) + _truncations("d", THREE_TURNS)]
    assert [len(batch) for batch in seen] == [2, 2, 1]
    assert sorted(ids for batch in seen for ids, _ in batch) == sorted(expected)
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "log.jsonl"))] == [1, 2, 3]
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["settings"]["--chat-turns"] == "each"
    capsys.readouterr()
    for other in ("last", "all"):
        assert train.main([*common, "--epochs", "2", "--resume", "--chat-turns", other]) == 2
        assert f"--chat-turns: each -> {other}" in capsys.readouterr().err
    assert train.main([*common, "--epochs", "2", "--resume", "--chat-turns", "each"]) == 0
    assert len(seen) == 6
