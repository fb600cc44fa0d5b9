"""The command line's documentation, as the tests read it: README's "Command line" section (the
overview of the commands, the server's quick start) and docs/CLI.md (every option, what each
command does)."""
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def readme_section() -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index("### Command line")
    return text[start:text.index("\n## ", start)]


def reference() -> str:
    return open(os.path.join(ROOT, "docs", "CLI.md"), encoding="utf-8").read()


def command_line() -> str:
    """README's section, then docs/CLI.md."""
    return readme_section() + "\n" + reference()
