"""The `prefix-attn` command: check, demo, train, generate, serve, eval."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys
from typing import List, Optional

from prefix_attn import cli_args

# The parser is built from prefix_attn.cli_parsers, which imports neither torch nor
# transformers: --help and usage errors answer at once. The package (when this process is the
# console script, see prefix_attn._is_the_command) and the command's module load once the
# arguments are parsed. A command whose module is missing is left out of the menu.
# optional packages a subcommand may need -> the extra of setup.py that installs them
_EXTRAS = {"transformers": "hf", "triton": "triton", "matplotlib": "bench"}


class _Version(argparse.Action):
    """--version: the versions line (:func:`prefix_attn.cli_args.versions`, which imports torch),
    computed only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            _load_package()
            line = cli_args.versions()
        except KeyboardInterrupt:  # in the seconds of imports: a clean stop, as a command's
            print("prefix-attn: stopped: SIGINT", file=sys.stderr)
            parser.exit(128 + signal.SIGINT)
        try:
            print(line, flush=True)  # one line, never wrapped at the terminal's width
        except BrokenPipeError:  # the reader is gone: quiet, as argparse's own --version (and --help)
            cli_args.silence_stdout()
        parser.exit()


def _load_package() -> None:
    import prefix_attn

    prefix_attn._load()


def build_parser() -> argparse.ArgumentParser:
    from prefix_attn import cli_parsers

    parser = argparse.ArgumentParser(prog="prefix-attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version,
                        help="print the versions of this package, torch and the optional packages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, _, _) in cli_parsers.COMMANDS.items():
        if importlib.util.find_spec(module) is not None:
            cli_parsers.add_parser(sub, name)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # no command: a usage error, said on standard error
        parser.print_help(sys.stderr)
        return 2
    try:
        _load_package()  # what `import prefix_attn` does, if not done yet (the console script)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # train and generate stop on their own terms; the others here
        print(f"prefix-attn {args.command}: stopped: SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # standard output closed by its reader (`| head`): a quiet stop
        cli_args.silence_stdout()
        return 128 + signal.SIGPIPE
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra = _EXTRAS.get(top)
        if extra is None:
            raise
        print(f"prefix-attn {args.command}: error: this needs the {top!r} package: "
              f"pip install {top} (or, in the checkout, pip install --no-build-isolation "
              f"'.[{extra}]')", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
