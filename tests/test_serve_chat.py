"""``prefix-attn generate --chat`` (prefix_attn.chat): requests rendered with the tokenizer's
chat template, a --prompt-prefix as the system message. Every answer must be what
``model.generate`` gives on the whole templated conversation without any prefix machinery."""
import json

import pytest
import torch

from prefix_attn import serve, tiny
from prefix_attn.serve import RequestError, main, read_requests

# ChatML-like, with a default system prompt when the conversation has none
CHATML = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Llama-2-like: the system message is folded into the first user turn when one follows
FOLDED = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
          "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
          "{% if not rest %}{{ '<<SYS>>' + sys + '<</SYS>>' }}{% endif %}"
          "{% for m in rest %}{% if m['role'] == 'user' %}{{ '[INST] ' }}"
          "{% if loop.first and sys %}{{ '<<SYS>>' + sys + '<</SYS>> ' }}{% endif %}"
          "{{ m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
# the same text for the system part either way, but its last newline merges with the user
# turn's first one into one token ("\n\n"): a text prefix that is not a token prefix
MERGING = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n' }}"
           "{% else %}{{ '\n' + m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
           "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}")
# a template that refuses a system message alone, and one that leaves system messages out
NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
DROPS_SYSTEM = "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}"


def chat_tokenizer(template=CHATML):
    """An HF byte-level BPE tokenizer (specials 0..4 as tiny_config's pad/bos/eos, one merge:
    "\\n\\n") with ``template`` as its chat template (None: none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["ĊĊ"])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                additional_special_tokens=specials[3:])
    if template is not None:
        t.chat_template = template
    return t


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def record_generate(monkeypatch, with_prefixes: bool = False) -> list:
    """The rows ``prefix-attn generate`` gives model.generate, padding removed (with
    ``with_prefixes``, ``(row, its prefix)`` pairs), filled as the command runs."""
    fed, load_model = [], serve._load_model

    def recording_load(*args, **kwargs):
        model, tok = load_model(*args, **kwargs)
        generate = model.generate

        def recording_generate(input_ids, attention_mask=None, prefixes=None, **kw):
            rows = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
            fed.extend(zip(rows, prefixes) if with_prefixes else rows)
            return generate(input_ids, attention_mask=attention_mask, prefixes=prefixes, **kw)
        model.generate = recording_generate
        return model, tok
    monkeypatch.setattr(serve, "_load_model", recording_load)
    return fed


def _results(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _model():
    return tiny.tiny_model("llama", vocab_size=len(chat_tokenizer()), hidden=64, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny Llama saved with a tokenizer of each template (and one with none), and a PEFT
    adapter for it."""
    root = tmp_path_factory.mktemp("chat")
    model = _model()
    for name, template in (("chatml", CHATML), ("folded", FOLDED), ("merging", MERGING),
                           ("no_system", NO_SYSTEM), ("drops_system", DROPS_SYSTEM), ("plain", None)):
        model.save_pretrained(str(root / name))
        chat_tokenizer(template).save_pretrained(str(root / name))
    save_adapter(model, root / "adapter", seed=7)
    return root


def save_adapter(model, folder, seed: int) -> None:
    """A PEFT adapter of 5 random virtual tokens for ``model``, saved in ``folder``."""
    from prefix_attn.bank import PrefixBank

    bank = PrefixBank.attach(model)
    shape = (bank.num_layers, bank.num_kv_heads, 5, bank.head_dim)
    g = torch.Generator().manual_seed(seed)
    bank.add("t", 3 * torch.randn(shape, generator=g), 3 * torch.randn(shape, generator=g))
    bank.save_peft("t", str(folder))


TERSE, KIND = "You are terse.", "Be kind, always."
REQUESTS = [
    {"id": "s1", "prefix": "terse", "prompt": "What is 2+2?"},
    {"id": "a", "prefix": "tenant", "prompt": "hi there"},
    {"id": "s2", "prefix": "kind", "prompt": "hello\n\n"},
    {"id": "n", "prompt": "no prefix at all"},
    {"id": "m1", "prefix": "terse", "messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "Hello."},
                                                 {"role": "user", "content": "And now?"}]},
    {"id": "m2", "messages": [{"role": "system", "content": "Own system."},
                              {"role": "user", "content": "q"}], "tag": 3},
    {"id": "e", "prefix": "kind", "prompt": ""},
]
SYSTEMS = {"terse": TERSE, "kind": KIND}


def _conversation(r):
    messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
    if r.get("prefix") in SYSTEMS:
        messages = [{"role": "system", "content": SYSTEMS[r["prefix"]]}] + messages
    return messages


def _run(tmp_path, folders, name, requests, *options, model="chatml"):
    f = _write(tmp_path / f"{name}.jsonl", [json.dumps(r) for r in requests])
    out = tmp_path / f"{name}-out.jsonl"
    rc = main(["-i", f, "-o", str(out), "--model", str(folders / model), "--chat",
               "--prompt-prefix", f"terse={TERSE}", "--prompt-prefix", f"kind={KIND}",
               "--adapter", f"tenant={folders / 'adapter'}", "--no-progress", *options])
    return rc, out


@pytest.mark.hf
def test_plan_gives_the_whole_conversations_tokens(folders):
    """The ids of each request are those of apply_chat_template on its whole conversation: after
    a prompt prefix, the entry's ids (the system message alone) then the job's; else the job's
    (the template's default system prompt included)."""
    from prefix_attn.chat import ChatTemplate
    from prefix_attn.serve_inputs import Source

    tok = tiny.load_tokenizer(str(folders / "chatml"))
    model = _model()
    chat = ChatTemplate(tok, str(folders / "chatml"))
    sources = [Source("terse", "--prompt-prefix", TERSE), Source("kind", "--prompt-prefix", KIND),
               Source("tenant", "--adapter", str(folders / "adapter"))]
    prompt_ids = serve._prompt_prefix_ids(sources, tok, chat, model.config.vocab_size)
    bank = serve._build_bank(model, sources, None, prompt_ids)
    requests = [serve_request(r, i + 1) for i, r in enumerate(REQUESTS)]
    jobs = serve._plan(requests, tok, bank, prompt_ids, "r.jsonl", chat)
    for r, job in zip(REQUESTS, jobs):
        full = tok.apply_chat_template(_conversation(r), add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
        if r.get("prefix") in SYSTEMS:
            alone = tok.apply_chat_template(_conversation(r)[:1], tokenize=True, return_dict=False)
            assert prompt_ids[r["prefix"]] == alone
            assert bank.entry_len(r["prefix"]) == len(alone)
            assert alone + job.ids == full, r["id"]
        else:
            assert job.ids == full and job.prefix == r.get("prefix"), r["id"]
    no_prefix = jobs[3].ids
    assert "You are a helpful assistant." in tok.decode(no_prefix)  # the template's default system


def serve_request(obj, line):
    from prefix_attn.serve_inputs import _parse_request

    return _parse_request(obj, f"r.jsonl:{line}", line)


@pytest.mark.hf
@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_answers_equal_generate_on_the_templated_conversation(tmp_path, folders, batch_size):
    """Greedy answers, mixed prefixes (two system prompts, an adapter, none, "messages" with and
    without a prompt prefix, an empty prompt): each equals model.generate on the token ids of
    apply_chat_template(whole conversation, add_generation_prompt=True), the plain model for
    the system prompts and the adapter's prefix (only) for its row."""
    from prefix_attn.bank import PrefixBank

    rc, out = _run(tmp_path, folders, f"b{batch_size}", REQUESTS, "--max-new-tokens", "6",
                   "--batch-size", batch_size)
    assert rc == 0
    res = _results(out)
    assert [r["id"] for r in res] == [r["id"] for r in REQUESTS]
    assert res[4]["messages"] == REQUESTS[4]["messages"] and "prompt" not in res[4]
    assert res[5]["tag"] == 3 and res[0]["prompt"] == REQUESTS[0]["prompt"]

    tok = tiny.load_tokenizer(str(folders / "chatml"))
    model = tiny.load_model_folder(str(folders / "chatml"))
    PrefixBank.attach(model).load_peft("tenant", str(folders / "adapter"))
    expected = []
    for r in REQUESTS:
        ids = tok.apply_chat_template(_conversation(r), add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        adapter = ["tenant"] if r.get("prefix") == "tenant" else None
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                               prefixes=adapter)
        new = g[0, len(ids):].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        expected.append((tok.decode(new, skip_special_tokens=True), len(new)))
    assert [(r["completion"], r["num_tokens"]) for r in res] == expected
    assert len({c for c, _ in expected}) > 3  # the conversations differ in what they give


@pytest.mark.hf
@pytest.mark.parametrize("template", ["folded", "merging"])
def test_a_template_that_renders_the_system_part_differently_is_refused(tmp_path, folders, capsys, template):
    """A template that folds the system message into the first user turn (text differs), or
    whose tokens merge across the boundary (text equal, tokens not): the system prompt's KV is
    not the conversation's; one error naming the prefix, nothing written."""
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prefix": "sys", "prompt": "why?"}),
                                      json.dumps({"prompt": "fine"})])
    out = tmp_path / "o.jsonl"
    rc = main(["-i", f, "-o", str(out), "--model", str(folders / template), "--chat",
               "--prompt-prefix", "sys=Be brief.", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "--prompt-prefix sys:" in err and "cannot be shared as a prefix with this chat template" in err
    assert "r.jsonl:1" in err and "r.jsonl:2" not in err
    # without the prompt prefix, the same conversation (its system message in "messages") is served
    f = _write(tmp_path / "m.jsonl", [json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "why?"}]})])
    assert main(["-i", f, "-o", str(out), "--model", str(folders / template), "--chat",
                 "--max-new-tokens", "2", "--no-progress"]) == 0


@pytest.mark.hf
def test_a_template_refusing_a_system_message_alone_names_the_prefix(tmp_path, folders, capsys):
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prefix": "sys", "prompt": "why?"})])
    rc = main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(folders / "no_system"),
               "--chat", "--prompt-prefix", "sys=Be brief.", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt-prefix sys: the chat template refuses a system message alone" in err
    assert "System role not supported" in err and "cannot be shared as a prefix" in err


@pytest.mark.hf
def test_a_template_rendering_a_system_message_alone_as_nothing_names_the_prefix(tmp_path, folders, capsys):
    """(It said the prompt "has no tokens", which the text has.)"""
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prefix": "sys", "prompt": "why?"})])
    rc = main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(folders / "drops_system"),
               "--chat", "--prompt-prefix", "sys=Be brief.", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--prompt-prefix sys: the chat template renders a system message alone as no tokens" in err


@pytest.mark.hf
@pytest.mark.parametrize("model", [None, "plain"])
def test_chat_without_a_chat_template_is_one_clear_error(tmp_path, folders, capsys, model):
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prompt": "hi"})])
    where = [] if model is None else ["--model", str(folders / model)]
    rc = main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--chat", "--no-progress", *where])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "has no chat template" in err
    assert ("byte tokenizer" in err) if model is None else (str(folders / model) in err)


@pytest.mark.hf
def test_bank_prompt_entries_and_doubled_system_messages_are_refused(tmp_path, folders, capsys):
    """A saved bank's prompt entry keeps no text to render as the system message; a request's
    own system message after a prompt prefix would be a second one: both named by line."""
    from prefix_attn.bank import PrefixBank

    tok = tiny.load_tokenizer(str(folders / "chatml"))
    model = tiny.load_model_folder(str(folders / "chatml"))  # the bank holds it weakly
    bank = PrefixBank.attach(model)
    bank.add_prompt("saved", torch.tensor(tok.apply_chat_template(
        [{"role": "system", "content": "x"}], tokenize=True, return_dict=False)))
    bank.save(str(tmp_path / "bank"))
    reqs = [{"prefix": "saved", "prompt": "a"},
            {"prefix": "terse", "messages": [{"role": "system", "content": "two"}, {"role": "user", "content": "b"}]},
            {"prompt": "fine"}]
    rc, out = _run(tmp_path, folders, "r", reqs, "--bank", str(tmp_path / "bank"))
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "2 request(s) that --chat cannot render" in err
    assert "r.jsonl:1: prompt prefix 'saved' comes from --bank" in err and "--prompt-prefix saved=TEXT" in err
    assert "r.jsonl:2: 'messages' starts with a system message, but prefix 'terse'" in err


@pytest.mark.parametrize("line, pattern", [
    ({"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, r"r.jsonl:2: give 'prompt' or 'messages', not both"),
    ({"messages": []}, r"r.jsonl:2: 'messages' must be a non-empty array .* got an empty array"),
    ({"messages": "hi"}, r"r.jsonl:2: 'messages' must be a non-empty array .* got a string"),
    ({"messages": ["hi"]}, r"r.jsonl:2: messages\[0\]: expected an object"),
    ({"messages": [{"role": "bot", "content": "a"}]}, r"r.jsonl:2: messages\[0\]: 'role' must be one of .*got 'bot'"),
    ({"messages": [{"content": "a"}]}, r"r.jsonl:2: messages\[0\]: 'role' must be one of .*got none"),
    ({"messages": [{"role": "user", "content": ["a"]}]},
     r"r.jsonl:2: messages\[0\]: content\[0\]: only text parts \(.*\) are served, got a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     r"r.jsonl:2: messages\[0\]: content\[0\]: only text parts \(.*\) are served, got type 'image_url'"),
    ({"messages": [{"role": "user", "content": {"text": "a"}}]}, r"r.jsonl:2: messages\[0\]: 'content' must be a string; got an object"),
    ({"messages": [{"role": "user"}]}, r"r.jsonl:2: messages\[0\]: 'content' must be a string; got none"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "user", "content": "b"}]}, r"r.jsonl:2: messages\[1\]: a system message may only come first"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     r"r.jsonl:2: the last message's role is 'assistant': end with a user message"),
])
def test_messages_are_validated_naming_file_and_line(tmp_path, line, pattern):
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', json.dumps(line)])
    with pytest.raises(RequestError, match=pattern):
        read_requests(f)


def test_messages_without_chat_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(serve, "_load_model", fail)
    f = _write(tmp_path / "r.jsonl", ['{"prompt": "ok"}', json.dumps({"messages": [{"role": "user", "content": "a"}]})])
    rc = main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "1 request(s) give 'messages', which needs --chat" in err and "r.jsonl:2" in err


@pytest.mark.hf
@pytest.mark.parametrize("model", [None, "plain"])
def test_chat_without_a_chat_template_is_refused_before_the_model_loads(tmp_path, folders, capsys,
                                                                         monkeypatch, model):
    """As train --chat does: the model (a large one) was loaded first, then refused."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(serve, "_load_model", fail)
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prompt": "hi"})])
    where = [] if model is None else ["--model", str(folders / model)]
    rc = main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--chat", "--no-progress", *where])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "has no chat template" in err
    assert not (tmp_path / "o.jsonl").exists()


# -- added by the mutation audit ------------------------------------------------------------

class _PromptEntries:
    """A bank whose every named prefix is a prompt entry (what request_ids asks of it)."""

    def kind(self, name):
        return "prompt"


@pytest.mark.hf
def test_a_split_system_prompt_names_three_requests_and_the_first_ones_difference():
    """MERGING: "Be brief.\\n" alone ends in a "\\n" token that a following user turn merges
    into "\\n\\n". The error names the first three requests and counts the rest ("and 0 more"
    never), and shows the first request's tokens from the first differing one."""
    from prefix_attn.chat import ChatTemplate
    from prefix_attn.serve_inputs import Request

    chat = ChatTemplate(chat_tokenizer(MERGING))
    chat.system_ids("sys", "Be brief.")
    prompts = ["apple", "berry", "cherry", "date", "elder"]

    def refusal(n):
        with pytest.raises(RequestError) as exc:
            chat.request_ids([Request(prompt=p, prefix="sys", line=i + 1) for i, p in enumerate(prompts[:n])],
                             _PromptEntries(), "r.jsonl")
        return str(exc.value)
    msg = refusal(5)
    assert "(requests r.jsonl:1, r.jsonl:2, r.jsonl:3 and 2 more)" in msg
    assert "its 10 tokens alone are not the conversation's first ones: from token 9, " \
           "'\\n' alone but '\\n\\nuser: a' once a user turn follows" in msg
    assert "(requests r.jsonl:1, r.jsonl:2, r.jsonl:3)" in refusal(3)


@pytest.mark.hf
def test_a_conversation_ending_in_a_tool_message_is_served(tmp_path):
    """A tool result is a turn the answer follows, as a user message is."""
    from prefix_attn.chat import ChatTemplate

    messages = [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "call"},
                {"role": "tool", "content": "sunny"}]
    (request,) = read_requests(_write(tmp_path / "r.jsonl", [json.dumps({"messages": messages})]))
    assert request.messages == messages
    tok = chat_tokenizer()
    ids = ChatTemplate(tok).request_ids([request], None, "r.jsonl")
    assert ids[1] == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)


@pytest.mark.hf
def test_a_template_error_is_named_by_its_first_line():
    """raise_exception("...\\n...") : the error quotes the message's first line, not its last."""
    from prefix_attn.chat import ChatTemplate

    template = "{{ raise_exception('No system role here.\\nSee the model card.') }}"
    with pytest.raises(RequestError) as exc:
        ChatTemplate(chat_tokenizer(template)).system_ids("sys", "Be brief.")
    assert "(TemplateError: No system role here.)" in str(exc.value)
    assert "model card" not in str(exc.value)


@pytest.mark.hf
def test_a_doubled_system_message_is_one_problem_even_where_the_template_refuses_it():
    """A request's own system message after a prompt prefix is named once: the conversation
    with two system messages is not rendered (a template refusing it added a second line and
    counted the request twice)."""
    from prefix_attn.chat import ChatTemplate
    from prefix_attn.serve_inputs import Request

    template = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
                "{{ raise_exception('a system message only first') }}{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    chat = ChatTemplate(chat_tokenizer(template))
    chat.system_ids("sys", "Be brief.")
    request = Request(prompt=None, prefix="sys", line=1, messages=[{"role": "system", "content": "two"},
                                                                    {"role": "user", "content": "q"}])
    with pytest.raises(RequestError) as exc:
        chat.request_ids([request], _PromptEntries(), "r.jsonl")
    assert str(exc.value).splitlines() == [
        "1 request(s) that --chat cannot render:",
        "  r.jsonl:1: 'messages' starts with a system message, but prefix 'sys' is the system message; "
        "leave one of them out"]


# -- added by the chat-template families audit ------------------------------------------------

# Gemma-3-like: BOS, then the system message folded into the first user turn; [system] alone
# is BOS only, which does start every conversation
FOLDS_AFTER_BOS = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\n\n' %}"
                   "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
                   "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\n' + (sys if loop.first else '') "
                   "+ m['content'] + '<|im_end|>\n' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.hf
def test_a_system_message_alone_rendered_without_its_text_is_refused():
    """A template rendering [system] alone as BOS only, whatever the text (Gemma 3, Mistral
    v0.3: the message goes into a user turn), was served: its one-token entry starts every
    conversation, but held none of the system prompt, each request carrying it whole. Refused
    as a template that folds it into a user turn is (README), naming the prefix."""
    from prefix_attn.chat import ChatTemplate

    chat = ChatTemplate(chat_tokenizer(FOLDS_AFTER_BOS))
    with pytest.raises(RequestError) as exc:
        chat.system_ids("sys", "Be brief.")
    assert str(exc.value) == (
        "--prompt-prefix sys: the chat template renders a system message alone as '<s>' whatever its text "
        "(it writes the system message only with a user turn, folded into one): the system prompt cannot be "
        "shared as a prefix with this template")
    # a system prompt that is the probe's text is told apart too; CHATML's holds its text
    with pytest.raises(RequestError, match="whatever its text"):
        chat.system_ids("sys", "Another system prompt.")
    tok = chat_tokenizer()
    assert "Another system prompt." in tok.decode(ChatTemplate(tok).system_ids("sys", "Another system prompt."))


# Phi-3-like: the EOS written at the end of a conversation rendered without the generation
# prompt, so after [system] alone but never where a user turn follows it
EOS_WHEN_CLOSED = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                   "{% else %}{{ eos_token }}{% endif %}")


@pytest.mark.hf
def test_a_system_prompt_is_shared_without_the_eos_closing_a_conversation(tmp_path, capsys):
    """Phi-3's template ends [system] alone with EOS, which the conversation has not there: the
    system prompt was refused as not the conversation's start. The entry is the system part
    less that EOS; the answers equal model.generate on the whole templated conversation."""
    from prefix_attn.chat import ChatTemplate

    tok = chat_tokenizer(EOS_WHEN_CLOSED)
    alone = tok.apply_chat_template([{"role": "system", "content": TERSE}], tokenize=True, return_dict=False)
    assert alone[-1] == tok.eos_token_id
    assert ChatTemplate(tok).system_ids("terse", TERSE) == alone[:-1]

    folder = str(tmp_path / "phi")
    model = _model()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    requests = [r for r in REQUESTS if r.get("prefix") != "tenant"]
    f = _write(tmp_path / "r.jsonl", [json.dumps(r) for r in requests])
    out = tmp_path / "o.jsonl"
    assert main(["-i", f, "-o", str(out), "--model", folder, "--chat", "--prompt-prefix", f"terse={TERSE}",
                 "--prompt-prefix", f"kind={KIND}", "--max-new-tokens", "5", "--batch-size", "3",
                 "--no-progress"]) == 0, capsys.readouterr().err
    expected = []
    for r in requests:
        ids = tok.apply_chat_template(_conversation(r), add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = g[0, len(ids):].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        expected.append((tok.decode(new, skip_special_tokens=True), len(new)))
    assert [(r["completion"], r["num_tokens"]) for r in _results(out)] == expected
    assert len({c for c, _ in expected}) > 2  # the conversations differ in what they give


@pytest.mark.hf
@pytest.mark.parametrize("text", ["Another system prompt.\n", " Another system prompt.", "Another system prompt."])
def test_a_system_prompt_that_trims_to_the_probe_text_is_served(text):
    """Llama 3's template trims the message: a system prompt differing from the one probe text
    only by blanks rendered as it did, and was refused as rendered "whatever its text"."""
    from chat_templates import family_tokenizer

    from prefix_attn.chat import ChatTemplate

    tok = family_tokenizer("llama3")
    ids = ChatTemplate(tok).system_ids("sys", text)
    assert "\n\nAnother system prompt." in tok.decode(ids)
