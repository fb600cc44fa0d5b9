"""`prefix-attn --help`, `prefix-attn COMMAND --help` and usage errors answer without importing
torch, transformers or triton (they took 4 to 6 s, all of it in `import prefix_attn`); a
command that runs loads the package as `import prefix_attn` does. Each case runs a copy of
the console script pip writes for the entry point, in a fresh interpreter, and reads
`sys.modules` at its exit (no timing)."""
import os
import subprocess
import sys

import pytest

from prefix_attn import cli

HEAVY = ("torch", "transformers", "triton")
_SCRIPT = """import atexit, sys
atexit.register(lambda: sys.stderr.write(
    "\\nHEAVY=" + ",".join(m for m in {heavy!r} if m in sys.modules) + "\\n"))
from prefix_attn.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


def _command(tmp_path, *argv):
    """(exit status, stdout, stderr without the last line, heavy modules imported)."""
    script = tmp_path / "bin" / "prefix-attn"  # the name pip gives the console script
    script.parent.mkdir(exist_ok=True)
    script.write_text(_SCRIPT.format(heavy=HEAVY))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    err, _, heavy = done.stderr.rstrip("\n").rpartition("\nHEAVY=")
    return done.returncode, done.stdout, err, [m for m in heavy.split(",") if m]


@pytest.mark.parametrize("argv, status, words", [
    (["--help"], 0, "usage: prefix-attn [-h] [--version] COMMAND"),
    (["train", "--help"], 0, "prefix-tune a local HF model"),
    (["generate", "--help"], 0, '"completion": "...", "num_tokens": 17, "finish_reason": "stop"}'),
    (["demo", "--help"], 0, "--skip-bench"),
    (["check", "--help"], 0, "every available backend against the reference"),
    (["train", "data.jsonl", "-o", "out", "--batch-size", "0"], 2,
     "prefix-attn train: error: argument --batch-size: must be at least 1, got 0"),
    (["train", "data.jsonl"], 2, "the following arguments are required: --output/-o"),
    (["generate", "-i", "r.jsonl", "-o", "a.jsonl", "--top-p", "2"], 2, "argument --top-p: must be in (0, 1]"),
    (["demo", "--seed", "x"], 2, "argument --seed: expected an integer, got 'x'"),
    (["serve", "--help"], 0, "POST /v1/chat/completions"),
    (["serve", "--port", "70000"], 2, "prefix-attn serve: error: argument --port: must be at most 65535"),
    (["eval", "--help"], 0, "the loss of a data file under each prefix, without training"),
    (["eval", "d.jsonl", "--batch-size", "0"], 2, "prefix-attn eval: error: argument --batch-size: must be at least 1"),
    (["serv"], 2, "invalid choice: 'serv'"),
    ([], 2, "usage: prefix-attn"),
])
def test_help_and_usage_errors_import_no_heavy_module(tmp_path, argv, status, words):
    code, out, err, heavy = _command(tmp_path, *argv)
    assert code == status and words in (out if status == 0 else err)
    assert heavy == []
    assert "Traceback" not in err and list(tmp_path.iterdir()) == [tmp_path / "bin"]


def test_a_command_that_runs_loads_the_package(tmp_path):
    code, out, err, heavy = _command(tmp_path, "check", "--backend", "torch", "--dtype", "float32")
    assert code == 0, err
    assert "1 passed, 0 failed" in out and {"torch", "transformers"} <= set(heavy)


def test_version_is_the_same_line_from_the_command(tmp_path, capsys):
    code, out, err, heavy = _command(tmp_path, "--version")
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert code == 0 and out == capsys.readouterr().out and out.startswith("prefix_attn ")


def test_import_prefix_attn_still_loads_everything(tmp_path):
    """Outside the console script the package imports as before: transformers' attention
    interface knows "prefix_attn" right after `import prefix_attn` (DESIGN.md, section 3)."""
    code = ("import sys, prefix_attn\n"
            "from transformers import AttentionInterface\n"
            "assert 'prefix_attn' in AttentionInterface._global_mapping\n"
            "assert 'prefix_attn.bank' in sys.modules and prefix_attn.PrefixBank\n"
            "assert callable(prefix_attn.load_backends) and 'prefix_attn.hf' in sys.modules\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout == "ok\n", done.stderr


def test_type_checkers_see_every_public_name():
    """The public names are set by _load at run time; editors and type checkers read them from
    the `if TYPE_CHECKING:` imports, which must name every one of __all__."""
    import ast

    import prefix_attn

    tree = ast.parse(open(prefix_attn.__file__, encoding="utf-8").read())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.dump(n.test))
    seen = {a.asname or a.name for n in block.body for a in n.names}
    assert seen == set(prefix_attn.__all__) - {"__version__"}


def test_ctrl_c_while_the_package_loads_is_a_clean_stop(monkeypatch, capsys):
    """A Ctrl-C in the seconds of imports ended in a KeyboardInterrupt traceback (the imports ran
    before main); they run inside main now."""
    import prefix_attn

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(prefix_attn, "_load", interrupted)
    assert cli.main(["check"]) == 130
    assert capsys.readouterr().err == "prefix-attn check: stopped: SIGINT\n"


def test_the_parsers_dtype_names_are_the_commands():
    """cli_parsers names the dtypes without torch; the commands map the same names."""
    from prefix_attn import check, cli_parsers, serve, train

    assert set(cli_parsers.TRAIN_DTYPES) == set(train.DTYPES)
    assert set(cli_parsers.GENERATE_DTYPES) == set(serve._DTYPES)
    assert list(cli_parsers.CHECK_DTYPES) == list(check.DTYPES)


def test_another_program_named_prefix_attn_gets_the_whole_package(tmp_path):
    """Only the console script (which calls prefix_attn.cli.main, loading the rest) may import
    the package lazily: any other program whose file is named prefix-attn got a package that
    had not registered "prefix_attn" with transformers (DESIGN.md, section 3) nor its backends."""
    script = tmp_path / "prefix-attn"
    script.write_text("import prefix_attn\n"
                      "from transformers import AttentionInterface\n"
                      "print(prefix_attn._loaded, 'prefix_attn' in AttentionInterface._global_mapping)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.stdout == "True True\n", done.stderr


def test_help_of_the_windows_launcher_imports_no_heavy_module(tmp_path):
    """pip's prefix-attn.exe on Windows is a launcher with the script appended as the
    __main__.py of a zip: __main__.__file__ is .../prefix-attn.exe/__main__.py (Python runs the
    zip the same way on every system)."""
    import zipfile

    exe = tmp_path / "bin" / "prefix-attn.exe"
    exe.parent.mkdir()
    with zipfile.ZipFile(exe, "w") as z:
        z.writestr("__main__.py", _SCRIPT.format(heavy=HEAVY))
    done = subprocess.run([sys.executable, str(exe), "--help"], capture_output=True, text=True, timeout=300)
    err, _, heavy = done.stderr.rstrip("\n").rpartition("\nHEAVY=")
    assert done.returncode == 0 and "usage: prefix-attn" in done.stdout, err
    assert heavy == ""


def test_version_to_a_closed_standard_output_is_quiet(tmp_path):
    """argparse's own --version action ignored a write error; ours printed a BrokenPipeError
    traceback (exit status 1) when the reader was gone before the line was written."""
    script = tmp_path / "prefix-attn"
    script.write_text(_SCRIPT.format(heavy=()))
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, str(script), "--version"], stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, \
        done.stderr


def test_ctrl_c_while_version_loads_the_package_is_a_clean_stop(monkeypatch, capsys):
    import prefix_attn

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(prefix_attn, "_load", interrupted)
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 130 and capsys.readouterr() == ("", "prefix-attn: stopped: SIGINT\n")
