"""``--chat-option KEY=VALUE``: variables of the chat template (Qwen3's ``enable_thinking``),
given to ``apply_chat_template`` by generate --chat and train --chat alike, recorded in a
training checkpoint."""
import argparse
import json

import pytest
import torch

from prefix_attn import cli_args, serve, train
from prefix_attn.chat import ChatTemplate
from test_serve_chat import _model, _write, chat_tokenizer

pytestmark = pytest.mark.hf

# Qwen3-like: with enable_thinking false, the assistant turn (generation prompt or the last
# answer) opens with an empty think block
THINKING = ("{% set off = enable_thinking is defined and enable_thinking is false %}"
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
            "{% if m['role'] == 'assistant' and loop.last and off %}{{ '<think>\n\n</think>\n\n' }}{% endif %}"
            "{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% if off %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{% endif %}")


@pytest.mark.parametrize("text, parsed", [("enable_thinking=false", ("enable_thinking", False)),
                                          ("depth=3", ("depth", 3)), ("name=bob", ("name", "bob")),
                                          ("tags=[\"a\"]", ("tags", ["a"])), ("empty=", ("empty", ""))])
def test_values_are_read_as_json_else_as_text(text, parsed):
    assert cli_args.chat_option(text) == parsed


@pytest.mark.parametrize("text, message", [("enable_thinking", "expected KEY=VALUE"), ("=1", "expected KEY=VALUE"),
                                           ("a-b=1", "expected KEY=VALUE"),
                                           ("tools=[]", "tools is set by --chat itself")])
def test_bad_options_are_usage_errors(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        cli_args.chat_option(text)


def test_the_template_gets_the_variables():
    tok = chat_tokenizer(THINKING)
    messages = [{"role": "user", "content": "hi"}]
    plain = ChatTemplate(tok).render(messages, True)
    off = ChatTemplate(tok, options={"enable_thinking": False}).render(messages, True)
    assert off == list(tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                               tokenize=True, return_dict=False))
    assert off != plain and "<think>" in tok.decode(off)


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    root = tmp_path_factory.mktemp("thinking")
    _model().save_pretrained(str(root))
    chat_tokenizer(THINKING).save_pretrained(str(root))
    return str(root)


def test_generate_feeds_the_templates_tokens_with_the_option(thinking, tmp_path, monkeypatch):
    """The rows generate --chat feeds are the conversation rendered with enable_thinking=False."""
    from transformers import GenerationMixin

    fed, real = [], GenerationMixin.generate

    def generate(self, input_ids=None, **kw):
        fed.extend(row[m.bool()].tolist() for row, m in zip(input_ids, kw["attention_mask"]))
        return real(self, input_ids, **kw)
    monkeypatch.setattr(GenerationMixin, "generate", generate)
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prompt": "hi"})])
    out = tmp_path / "o.jsonl"
    assert serve.main(["-i", f, "-o", str(out), "--model", thinking, "--chat", "--chat-option",
                       "enable_thinking=false", "--max-new-tokens", "2", "--no-progress"]) == 0
    tok = chat_tokenizer(THINKING)
    assert fed == [list(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                enable_thinking=False, tokenize=True, return_dict=False))]


def test_an_option_without_chat_is_refused(thinking, tmp_path, capsys):
    f = _write(tmp_path / "r.jsonl", [json.dumps({"prompt": "hi"})])
    assert serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--chat-option", "enable_thinking=false",
                       "--no-progress"]) == 2
    assert "template variables need --chat" in capsys.readouterr().err
    data = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "q", "completion": "a"})] * 4)
    assert train.main([data, "-o", str(tmp_path / "run"), "--chat-option", "x=1", "--no-progress"]) == 2
    assert "template variables need --chat" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_records_the_options_and_resume_refuses_others(thinking, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": f"q{i}", "completion": "a"}) for i in range(4)])
    out = str(tmp_path / "run")
    common = [data, "-o", out, "--model", thinking, "--chat", "--batch-size", "2", "--eval-every", "0",
              "--num-virtual-tokens", "2", "--no-progress"]
    assert train.main([*common, "--max-steps", "1", "--chat-option", "enable_thinking=false"]) == 0
    ckpt = torch.load(f"{out}/checkpoint.pt", weights_only=True)
    assert ckpt["settings"]["--chat-option"] == '{"enable_thinking": false}'
    capsys.readouterr()
    assert train.main([*common, "--max-steps", "2", "--resume"]) == 2
    assert '--chat-option: {"enable_thinking": false} -> {}' in capsys.readouterr().err
    assert train.main([*common, "--max-steps", "2", "--resume", "--chat-option", "enable_thinking=false"]) == 0
