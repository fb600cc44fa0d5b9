"""The `prefix-attn` command line: check's table and exit status."""
import os
import subprocess
import sys

import pytest
import torch

from prefix_attn import check, cli


def test_check_table_passes_for_torch_backend(capsys):
    assert cli.main(["check", "--backend", "torch", "--dtype", "float32", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert "| torch | cpu | float32 |" in out and "| torch | cpu | float16 |" in out
    assert "2 passed, 0 failed" in out


def test_check_reports_a_wrong_backend_as_failure(monkeypatch):
    import prefix_attn.api as api
    real = api.prefix_attention

    def wrong(*a, **k):  # a backend that is off by a little: must fail the tolerance
        return real(*a, **k) * 1.01
    monkeypatch.setattr(check, "prefix_attention", wrong)
    rows = check.run_checks(["torch"], ["float32"])
    assert len(rows) == 1 and not rows[0]["ok"]
    assert "FAIL" in check.format_table(rows)


def test_check_catches_a_gradient_for_an_entry_no_row_selects(monkeypatch):
    """The check's bank has an entry that no row selects (its docstring said so while every
    entry was selected): a backend giving that entry a gradient must fail."""
    import prefix_attn.api as api
    real = api.prefix_attention

    def leaky(q, k, v, pk, pv, **kw):  # the same output; a gradient for the last entry
        assert int(kw["prefix_ids"].max()) < pk.shape[0] - 1  # no row selects it
        return real(q, k, v, pk, pv, **kw) + (pk[-1] - pk[-1].detach()).sum()
    monkeypatch.setattr(check, "prefix_attention", leaky)
    rows = check.run_checks(["torch"], ["float32"])
    assert len(rows) == 1 and not rows[0]["ok"] and rows[0]["worst"] == "dprefix_k"


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "prefix_attn.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "check" in out


def test_check_gives_the_same_table_every_run():
    first = check.run_checks(["torch"], ["float16"])
    second = check.run_checks(["torch"], ["float16"])
    assert first == second


def test_check_runs_on_a_device_given_with_its_index(capsys):
    """--device cpu:0 (or cuda:0) was compared as a string with the backends' device types:
    no backend matched, nothing was checked, and the command said "0 passed, 0 failed" and
    exited 0."""
    assert cli.main(["check", "--device", "cpu:0", "--backend", "torch", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "| torch | cpu:0 | float32 |" in out and "1 passed, 0 failed" in out


def _cuda_only(monkeypatch):
    """The torch backend as if it ran on CUDA tensors only."""
    import dataclasses

    real = check.get_backend
    monkeypatch.setattr(check, "get_backend", lambda name: dataclasses.replace(real(name), devices=("cuda",)))
    monkeypatch.setattr(check, "available_backends", lambda: ["torch"])


def test_check_that_runs_nothing_fails(monkeypatch, capsys):
    """A check that ran no backend at all (every one for another device, or the Triton
    interpreter asked for bfloat16 only) passed with "0 passed, 0 failed"."""
    _cuda_only(monkeypatch)
    assert cli.main(["check", "--backend", "torch", "--device", "cpu"]) == 1
    out = capsys.readouterr()
    assert "nothing was checked: torch runs on cuda tensors, not cpu" in out.err and "passed" not in out.out


@pytest.mark.skipif(not os.environ.get("TRITON_INTERPRET"), reason="the Triton interpreter's case")
def test_check_of_triton_in_bfloat16_under_the_interpreter_fails(capsys):
    from prefix_attn.backends import available_backends

    if "triton" not in available_backends():
        pytest.skip("triton is not installed")
    assert cli.main(["check", "--backend", "triton", "--dtype", "bfloat16"]) == 1
    assert "the Triton interpreter cannot compute in bfloat16" in capsys.readouterr().err


def test_check_usage_errors_exit_2(capsys):
    import torch

    assert cli.main(["check", "--backend", "nope"]) == 2
    assert "got 'nope'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["check", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
        assert cli.main(["check", "--backend", "cuda"]) == 2
        assert "it needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["check", "demo"])
@pytest.mark.parametrize("var, value, words", [
    ("PREFIX_ATTN_BACKEND", "gpu", "not a backend"),
    ("PREFIX_ATTN_CPU_PATH", "foo", "expected one of cascade, rows"),
])
def test_check_and_demo_refuse_bad_switches_up_front(monkeypatch, capsys, command, var, value, words):
    """check ignored PREFIX_ATTN_BACKEND=gpu (exit 0) and reported PREFIX_ATTN_CPU_PATH=foo as
    failing kernels; demo ran its first section and died in a traceback. Both are usage errors
    now, named before any work, as train and generate do."""
    monkeypatch.setenv(var, value)
    assert cli.main([command]) == 2
    out = capsys.readouterr()
    assert f"{var}={value!r}" in out.err and words in out.err and out.out == ""


def test_check_runs_with_a_backend_variable_it_does_not_use(monkeypatch, capsys):
    """check names each backend it runs: PREFIX_ATTN_BACKEND=cuda on a machine without it (or
    cpu on a GPU machine) was refused although it chooses nothing there."""
    monkeypatch.setenv("PREFIX_ATTN_BACKEND", "cuda")
    assert cli.main(["check", "--backend", "torch", "--dtype", "float32"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("command", [["train", "data.jsonl", "-o", "out"],
                                     ["generate", "-i", "r.jsonl", "-o", "o.jsonl"], ["demo"]])
@pytest.mark.parametrize("seed, words", [
    ("99999999999999999999", "must be at most 9223372036854775807"),
    ("9223372036854775808", "must be at most 9223372036854775807"),  # 2**63: one past
    ("-9223372036854775809", "must be at least -9223372036854775808"),
    ("x", "expected an integer, got 'x'")])
def test_a_seed_out_of_range_is_a_usage_error(tmp_path, monkeypatch, capsys, command, seed, words):
    """A --seed torch cannot take (2**64 and over) ended train in a traceback after the data was
    read, and generate in "Overflow when unpacking long long" after the model had loaded."""
    monkeypatch.chdir(tmp_path)  # nothing may be written: no file is there to read either
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--seed", seed])
    assert info.value.code == 2 and f"argument --seed: {words}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_negative_seed_is_accepted(tmp_path, capsys):
    """Negative seeds were accepted (torch wraps them) until the range check refused them, and
    with them the resume of a run made so (a review)."""
    from prefix_attn import cli_args

    assert cli_args.seed("-5") == -5
    torch.manual_seed(cli_args.seed(str(-2 ** 63)))


def test_device_that_torch_does_not_know_is_named_plainly(capsys):
    assert cli.main(["check", "--device", "gpu"]) == 2
    assert "--device gpu: not a torch device; use cpu, cuda or cuda:N" in capsys.readouterr().err


def test_a_missing_optional_package_is_a_clean_error(monkeypatch, capsys):
    """Without transformers (a core install), the HF subcommands say what to install."""
    from prefix_attn import train

    def no_transformers(args):
        raise ModuleNotFoundError("No module named 'transformers'", name="transformers")
    monkeypatch.setattr(train, "run", no_transformers)
    assert cli.main(["train", "data.jsonl", "-o", "out"]) == 2
    assert "pip install transformers (or, in the checkout, pip install --no-build-isolation '.[hf]')" \
        in capsys.readouterr().err


def test_check_catches_a_gradient_within_an_unselected_entrys_length(monkeypatch):
    """The unselected entry of check's bank has a length: a backend that gives its valid positions
    a gradient (as one reading the wrong entry would) fails. Kills: that entry of length 0 (the
    leak then adds nothing and check passes)."""
    import prefix_attn.api as api

    real = api.prefix_attention

    def leaky(q, k, v, pk, pv, **kw):
        n = int(kw["prefix_lens"][-1])
        return real(q, k, v, pk, pv, **kw) + (pk[-1, :, :n] - pk[-1, :, :n].detach()).sum()
    monkeypatch.setattr(check, "prefix_attention", leaky)
    rows = check.run_checks(["torch"], ["float32"])
    assert len(rows) == 1 and not rows[0]["ok"] and rows[0]["worst"] == "dprefix_k"


def test_version_names_the_versions_a_bug_report_needs(capsys, monkeypatch):
    """`prefix-attn --version` (and the first line of `check`): this package, Python, torch and
    its CUDA, the optional packages ("-" when missing), and a transformers too old for the HF
    integration said so."""
    import platform
    from importlib import metadata

    import prefix_attn

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    line = " ".join(capsys.readouterr().out.split())
    assert line.startswith(f"prefix_attn {prefix_attn.__version__}, Python {platform.python_version()}")
    assert f"torch {torch.__version__}" in line
    assert f"transformers {metadata.version('transformers')}," in line and "too old" not in line

    real = metadata.version

    def older(dist):
        if dist == "transformers":
            return "5.12.1"
        if dist == "triton":
            raise metadata.PackageNotFoundError(dist)
        return real(dist)
    monkeypatch.setattr(metadata, "version", older)
    assert cli.main(["check", "--backend", "torch", "--dtype", "float32"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "triton -," in first
    assert "transformers 5.12.1 (too old: the HF integration needs 5.15 or newer)" in first
