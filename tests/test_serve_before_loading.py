"""What depends only on the tokenizer and the model's config is refused before the weights load
(``prefix_attn.serve.prepare``): a large model is not loaded for minutes to be refused in a line.
The messages are the ones the same checks give after loading."""
import json

import pytest
import torch

from prefix_attn import serve, serve_http, tiny

from test_serve_chat import NO_SYSTEM, chat_tokenizer

pytestmark = pytest.mark.hf


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def no_weights(monkeypatch):
    """Loading the model's weights fails the test."""
    def fail(*a, **k):
        raise AssertionError("the model's weights were loaded")
    monkeypatch.setattr(serve, "_load_model", fail)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny GPT-2 (256 positions, 128 tokens: bytes above 124 are not in it) with the byte
    tokenizer, an adapter of 6 virtual tokens and a bank of a fixed entry (6) and a prompt one."""
    from prefix_attn.bank import PrefixBank

    root = tmp_path_factory.mktemp("gpt2")
    model = tiny.tiny_model("gpt2", vocab_size=128)
    model.save_pretrained(str(root / "model"))
    tiny.ByteTokenizer().save_pretrained(str(root / "model"))
    bank = PrefixBank.attach(model)
    shape = (bank.num_layers, bank.num_kv_heads, 6, bank.head_dim)
    bank.add("t", torch.randn(shape), torch.randn(shape))
    bank.save_peft("t", str(root / "adapter"))
    bank.add_prompt("saved", torch.tensor([1, 70, 71]))
    bank.save(str(root / "bank"))
    return root


def test_requests_too_long_for_any_prefix_are_refused_before_the_weights_load(tmp_path, gpt2, capsys, no_weights,
                                                                             monkeypatch):
    """Prefix lengths known without the weights: a --bank entry's (the file's header), an
    adapter's (num_virtual_tokens), a --prompt-prefix's (its tokens; an empty prompt after it runs
    its last token after the rest)."""
    rows = [{"prefix": "t", "prompt": "x" * 247},  # 248 + 6 + 2 = 256: fits
            {"prefix": "t", "prompt": "x" * 248},  # the bank's entry
            {"prefix": "ad", "prompt": "y" * 248},  # the adapter
            {"prefix": "pp", "prompt": "z" * 250},  # "abc" + start token: 4
            {"prefix": "pp", "prompt": "", "max_new_tokens": 253},  # 1 + 3 + 253
            {"prefix": "saved", "prompt": "w" * 251}]  # 3 tokens in the file
    f = _write(tmp_path / "r.jsonl", rows)
    options = ["-o", str(tmp_path / "o.jsonl"), "--model", str(gpt2 / "model"), "--bank", str(gpt2 / "bank"),
               "--adapter", f"ad={gpt2 / 'adapter'}", "--prompt-prefix", "pp=abc", "--max-new-tokens", "2",
               "--no-progress"]
    rc = serve.main(["-i", f] + options)
    err = capsys.readouterr().err
    assert rc == 2 and "3 request(s) longer than the model's 256 positions" in err
    assert "r.jsonl:2: 249 prompt tokens + 6 prefix tokens (prefix t) + 2 new tokens = 257" in err
    assert "r.jsonl:3: 249 prompt tokens + 6 prefix tokens (prefix ad) + 2 new tokens = 257" in err
    assert "r.jsonl:5: 1 prompt tokens + 3 prefix tokens (prefix pp) + 253 new tokens = 257" in err
    assert "r.jsonl:1:" not in err and "r.jsonl:4:" not in err and "r.jsonl:6:" not in err
    assert not (tmp_path / "o.jsonl").exists()
    monkeypatch.undo()  # with the weights, the requests that fit run
    assert serve.main(["-i", _write(tmp_path / "fit.jsonl", [rows[0], rows[3], rows[5]])] + options) == 0


def test_tokens_the_model_lacks_are_refused_before_the_weights_load(tmp_path, gpt2, capsys, no_weights):
    f = _write(tmp_path / "r.jsonl", [{"prompt": "ok"}, {"prompt": "caf\u00e9"}])
    rc = serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(gpt2 / "model"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "1 request(s) with tokens the model does not have:" in err and "r.jsonl:2:" in err


@pytest.fixture(scope="module")
def no_system(tmp_path_factory):
    """A tiny Llama whose chat template refuses a system message."""
    folder = tmp_path_factory.mktemp("chat") / "no_system"
    tok = chat_tokenizer(NO_SYSTEM)
    tiny.tiny_model("llama", vocab_size=len(tok)).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_a_conversation_the_template_refuses_is_said_before_the_weights_load(tmp_path, no_system, capsys,
                                                                             no_weights):
    f = _write(tmp_path / "r.jsonl", [{"prompt": "hi"},
                                      {"messages": [{"role": "system", "content": "s"},
                                                    {"role": "user", "content": "q"}]}])
    rc = serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(no_system), "--chat",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "1 request(s) that --chat cannot render:" in err
    assert "r.jsonl:2: the chat template refuses this conversation" in err and "System role not supported" in err


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_a_prompt_prefix_the_template_refuses_is_said_before_the_weights_load(tmp_path, no_system, capsys,
                                                                              no_weights, command):
    options = ["--model", str(no_system), "--chat", "--prompt-prefix", "sys=Be brief."]
    if command == "serve":
        rc = serve_http.main(["--port", "0", "--quiet"] + options)
    else:
        f = _write(tmp_path / "r.jsonl", [{"prefix": "sys", "prompt": "why?"}])
        rc = serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress"] + options)
    err = capsys.readouterr().err
    assert rc == 2 and f"prefix-attn {command}: error: --prompt-prefix sys: the chat template refuses a " \
                       "system message alone" in err


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """An adapter (6 virtual tokens, safetensors), the same as a torch file, and a saved bank, all
    for a model of 3 layers where the tiny GPT-2 has 2; an adapter whose tensor header disagrees
    with its config."""
    from prefix_attn.bank import PrefixBank

    root = tmp_path_factory.mktemp("other")
    bank = PrefixBank(3, 2, 16)  # the tiny GPT-2: (2, 4, 8)
    bank.add("t", torch.randn(3, 2, 6, 16), torch.randn(3, 2, 6, 16))
    bank.save_peft("t", str(root / "adapter"))
    bank.save(str(root / "bank"))
    (root / "bin").mkdir()
    (root / "bin" / "adapter_config.json").write_text((root / "adapter" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    torch.save(load_file(str(root / "adapter" / "adapter_model.safetensors")), str(root / "bin" / "adapter_model.bin"))
    return root


@pytest.mark.parametrize("command", ["generate", "serve", "eval"])
@pytest.mark.parametrize("source, error", [
    ("adapter", "adapter/adapter_config.json: num_layers=3 but this model needs num_layers=2"),
    ("bin", "bin/adapter_config.json: num_layers=3 but this model needs num_layers=2"),
    ("bank", "bank/prefix_bank.safetensors: saved for (L, Hkv, D)=(3, 2, 16), but the model has (2, 4, 8)"),
])
def test_an_adapter_or_bank_of_another_model_is_refused_before_the_weights_load(
        tmp_path, gpt2, other_model, capsys, no_weights, command, source, error):
    from prefix_attn import cli

    given = ["--bank", str(other_model / source)] if source == "bank" else \
        ["--adapter", f"t={other_model / source}"]
    options = ["--model", str(gpt2 / "model"), *given]
    f = _write(tmp_path / "r.jsonl", [{"prefix": "t", "prompt": "hi", "completion": " there"}])
    if command == "serve":
        rc = cli.main(["serve", "--port", "0", "--quiet", *options])
    elif command == "eval":
        rc = cli.main(["eval", f, "--no-progress", *options])
    else:
        rc = cli.main(["generate", "-i", f, "-o", str(tmp_path / "o.jsonl"), "--no-progress", *options])
    err = capsys.readouterr().err
    assert rc == 2 and f"prefix-attn {command}: error: " in err and error in err, err
    assert not (tmp_path / "o.jsonl").exists()


def test_an_adapter_whose_tensor_disagrees_with_its_config_is_refused_before_the_weights_load(
        tmp_path, gpt2, capsys, no_weights):
    """The safetensors header is read, not the tensor: its shape checked as loading checks it."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(gpt2 / "adapter", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 7}))
    f = _write(tmp_path / "r.jsonl", [{"prefix": "t", "prompt": "hi"}])
    rc = serve.main(["-i", f, "-o", str(tmp_path / "o.jsonl"), "--model", str(gpt2 / "model"),
                     "--adapter", f"t={bad}", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "bad/adapter_model.safetensors: prompt_embeddings has shape [6, 128], expected [P=7" in err, err
