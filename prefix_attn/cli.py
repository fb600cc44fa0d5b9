"""The `prefix-attn` command: check, demo, train, generate."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import List, Optional

# subcommand modules; each has add_parser(subparsers) -> parser with `func` set. A module that
# is missing is left out of the menu; any other import error is raised.
# optional packages a subcommand may need -> the extra of setup.py that installs them
_EXTRAS = {"transformers": "hf", "triton": "triton", "matplotlib": "bench"}
_SUBCOMMANDS = ("prefix_attn.check", "prefix_attn.demo", "prefix_attn.train", "prefix_attn.serve")


def build_parser() -> argparse.ArgumentParser:
    from prefix_attn.cli_args import versions

    # raw text: the versions stay one line (argparse wraps them at the terminal's width otherwise)
    parser = argparse.ArgumentParser(prog="prefix-attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=versions(),
                        help="print the versions of this package, torch and the optional packages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            importlib.import_module(name).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):  # no command: a usage error, said on standard error
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # train and generate stop on their own terms; the others here
        print(f"prefix-attn {args.command}: stopped: SIGINT", file=sys.stderr)
        return 128 + signal.SIGINT
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
