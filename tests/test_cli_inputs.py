"""Bad values given on the `prefix-attn` command line: one clear line on standard error, exit
status 2, before any model loads."""
import pytest

from prefix_attn import cli, serve


def test_prompt_prefix_text_that_is_not_utf8_is_named(tmp_path, monkeypatch, capsys):
    """A --prompt-prefix holding bytes that are not UTF-8 (Python passes them on as lone
    surrogates) loaded the model, then failed with "'utf-8' codec can't encode characters in
    position 2-3: surrogates not allowed", naming neither the option nor the prefix."""
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "hi", "prefix": "s"}\n')

    def no_model(*a, **k):
        raise AssertionError("the model loaded before the options were checked")
    monkeypatch.setattr(serve, "_load_model", no_model)
    argv = ["generate", "-i", str(requests), "-o", str(tmp_path / "a.jsonl"),
            "--prompt-prefix", b"s=ab\xff\xfe".decode("utf-8", "surrogateescape")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err == ("prefix-attn generate: error: --prompt-prefix s: the text is not UTF-8 "
                   "(byte 0xff at character 3)\n")
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.hf
@pytest.mark.parametrize("command", [["train", "DATA", "-o", "OUT"], ["generate", "-i", "DATA", "-o", "OUT"],
                                     ["demo", "--skip-check", "--skip-bench"]])
def test_a_file_given_as_model_folder_is_called_a_file(command, tmp_path, capsys):
    """--model model.safetensors (a file where the folder belongs) was "model folder not
    found", as if nothing were there."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hi there"}\n' if command[0] == "train" else '{"prompt": "hi"}\n')
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not a folder")
    argv = [str(data) if a == "DATA" else str(tmp_path / "out") if a == "OUT" else a for a in command]
    assert cli.main([*argv, "--model", str(weights), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--model {weights} is a file, not a model folder" in err


def test_requests_naming_prefixes_when_none_is_given_say_how_to_give_them(tmp_path, monkeypatch, capsys):
    """Requests with a "prefix" and no --adapter / --prompt-prefix / --bank said "known
    prefixes: []"."""
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt": "hi", "prefix": "support"}\n')
    monkeypatch.setattr(serve, "_load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert cli.main(["generate", "-i", str(requests), "-o", str(tmp_path / "a.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prefix-attn generate: error: 1 request(s) name a prefix, but no prefix was "
                          "given: serve them with --adapter NAME=DIR, --prompt-prefix NAME=TEXT or --bank DIR")
    assert "r.jsonl:1: unknown prefix 'support'" in err and "[]" not in err
