"""What the `prefix-attn` commands write where: results on standard output (so that they can
be piped), progress, notes and warnings on standard error."""
import json

import pytest

from prefix_attn import cli

pytestmark = pytest.mark.hf


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i % 3}:", "completion": f" answer {i % 4}"}) + "\n"
                            for i in range(12)))
    return str(path)


def test_train_writes_only_its_summary_to_standard_output(data, tmp_path, capsys):
    """The eval losses ("step N: eval loss X") went to standard output (tqdm's write defaults to
    it) while the bar and every note went to standard error: `train ... > result` mixed them
    into the one result line, --no-progress or not."""
    out = str(tmp_path / "run")
    assert cli.main(["train", data, "-o", out, "--max-steps", "4", "--eval-every", "2",
                     "--num-virtual-tokens", "4", "--batch-size", "4", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [captured.out.strip()]
    assert captured.out.startswith("trained 4 steps, last loss ")
    assert "step 2: eval loss " in captured.err and "step 4: eval loss " in captured.err


def test_version_is_one_line_whatever_the_terminal_width(monkeypatch, capsys):
    """argparse wrapped the versions at the terminal's width (two lines at 80 columns): the
    "one line for a bug report" came out as two, or five in a narrow terminal."""
    monkeypatch.setenv("COLUMNS", "40")
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and out.startswith("prefix_attn ") and "peft " in out


def test_no_command_is_a_usage_error_on_standard_error(capsys):
    """`prefix-attn` alone exited 2 (an error) with its help on standard output."""
    assert cli.main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: prefix-attn" in captured.err and "COMMAND" in captured.err


def test_demo_no_progress_writes_nothing_to_standard_error(capsys):
    """demo had no --no-progress: its three bars (pretraining, prefix tuning, timing) always
    went to standard error."""
    assert cli.main(["demo", "--skip-check", "--skip-bench", "--pretrain-steps", "2", "--steps", "2",
                     "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "demo finished" in captured.out


def test_demo_and_check_help_say_what_they_do(capsys):
    """`demo --help` and `check --help` showed the options only, without what the command does."""
    for command, words in (("demo", "prefix-tunes a small model"), ("check", "against the reference")):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert words in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["check", "--backend", "torch", "--dtype", "float32"],
                                  ["demo", "--skip-check", "--skip-bench", "--steps", "2",
                                   "--pretrain-steps", "2", "--no-progress"]])
def test_a_reader_closing_standard_output_stops_the_command_quietly(argv):
    """`prefix-attn check | head -1` (or demo, or train's result line) ended in a BrokenPipeError
    traceback with exit status 1; generate already stopped quietly with 141."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "prefix_attn.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err
