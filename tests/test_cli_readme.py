"""The command line's documentation (README's "Command line" section and docs/CLI.md) and the parser agree: every option of every command is
documented there, and every option documented there exists."""
import argparse
import re

import cli_docs

from prefix_attn.cli import build_parser

def _section() -> str:
    return cli_docs.command_line()


def _options():
    """{command: [long option]} of the `prefix-attn` parser."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
            for name, p in sub.choices.items()}


def test_every_option_is_in_the_command_line_section():
    """README named about half of the options (train's --lr, --output, --name, --weight-decay,
    --gradient-checkpointing, generate's --temperature, --top-p, demo's --steps, ... were
    missing)."""
    section = _section()
    missing = {c: [o for o in opts if not re.search(re.escape(o) + r"(?![\w-])", section)]
               for c, opts in _options().items()}
    assert {c: m for c, m in missing.items() if m} == {}
    for command in _options():
        assert f"prefix-attn {command}" in section


def _torchrun_options():
    """The launcher's own options (the section's torchrun command for several GPUs)."""
    from torch.distributed.run import get_args_parser

    return {s for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")}


def test_every_option_in_the_command_line_section_exists():
    known = {o for opts in _options().values() for o in opts} | {"--version", "--help"} | _torchrun_options()
    assert sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _section())) - known) == []


def test_each_command_s_bullet_lists_its_options():
    """The list "Every option, its default in parentheses" has one bullet per command, which
    must name all of that command's options (train's and generate's --chat were only in the
    prose of the section, which the test above is content with)."""
    section = _section()
    bullets = section[section.index("Every option, its default"):].split("\n\n")[1]
    by_command = {re.match(r"`(\w+)", b).group(1): b for b in bullets.removeprefix("- ").split("\n- ")}
    missing = {c: [o for o in opts if not re.search(re.escape(o) + r"(?![\w-])", by_command.get(c, ""))]
               for c, opts in _options().items()}
    assert {c: m for c, m in missing.items() if m} == {}
