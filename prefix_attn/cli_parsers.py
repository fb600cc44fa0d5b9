"""The arguments of every ``prefix-attn`` subcommand, defined without importing torch or
transformers, so that ``prefix-attn --help``, ``prefix-attn COMMAND --help`` and usage errors
answer at once: :func:`prefix_attn.cli.main` loads the package and the command's module
after the arguments are parsed. Each command's module keeps its ``add_parser`` (these
arguments with its own ``run``)."""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import sys
from typing import Callable, Optional

from . import cli_args, train_schedule
from .tool_calls import PARSERS as TOOL_CALL_PARSERS

DEFAULT_MAX_LENGTH = 256  # train's --max-length
# the names of the dtypes each command takes (its module maps them to torch dtypes)
TRAIN_DTYPES = ("float32", "bfloat16")
GENERATE_DTYPES = ("float32", "float16", "bfloat16")
CHECK_DTYPES = ("float32", "float16", "bfloat16")
# generate's decoding options (argparse dest -> parser of one value): the command's options and a
# request's fields of the same names (prefix_attn.serve_options) take the same values
DECODING_TYPES = {
    "max_new_tokens": cli_args.int_at_least(1),
    "temperature": cli_args.float_where(lambda t: t > 0, "> 0"),
    "top_p": cli_args.float_where(lambda t: 0 < t <= 1, "in (0, 1]"),
    "top_k": cli_args.int_at_least(0),
    "min_p": cli_args.float_where(lambda m: 0 <= m <= 1, "in [0, 1]"),
    "repetition_penalty": cli_args.float_where(lambda r: r > 0, "> 0"),
    "num_beams": cli_args.int_at_least(1),
    "stop": cli_args.stop_text,
}


def module_doc(name: str) -> Optional[str]:
    """The docstring of module ``name`` (a command's description), read from its source
    without importing it (torch and transformers would come with it)."""
    if name in sys.modules:
        return sys.modules[name].__doc__
    try:
        spec = importlib.util.find_spec(name)
        with open(spec.origin, encoding="utf-8") as f:
            return ast.get_docstring(ast.parse(f.read()), clean=False)
    except (AttributeError, OSError, SyntaxError, TypeError, ValueError):  # no source (a .pyc only)
        return importlib.import_module(name).__doc__


class LazyRun:
    """``func`` of a command parsed before its module is imported: ``module.run(args)``,
    looked up when called."""

    def __init__(self, module: str):
        self.module = module

    def __call__(self, args: argparse.Namespace):
        return importlib.import_module(self.module).run(args)


def check_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefix-attn check`` (:mod:`prefix_attn.check`)."""
    p.add_argument("--backend", action="append", metavar="NAME",
                   help="only this backend: triton, cuda, cpu or torch (repeatable; default: every available one)")
    p.add_argument("--dtype", action="append", choices=list(CHECK_DTYPES),
                   help="only this dtype (repeatable; default: all three)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: each backend's own)")


def demo_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefix-attn demo`` (:mod:`prefix_attn.demo`)."""
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a local HF causal LM folder (omit for the built-in tiny model)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    positive = cli_args.int_at_least(1)
    p.add_argument("--steps", type=positive, default=150,
                   help="most prefix-tuning steps (stops early once the loss has halved)")
    p.add_argument("--pretrain-steps", type=positive, default=150,
                   help="steps of training the tiny base (ignored with --model)")
    p.add_argument("--virtual-tokens", type=positive, default=16, help="prefix length of each task")
    p.add_argument("--seed", type=cli_args.seed, default=0,
                   help="seed of the data, the base and the prefixes, -2**63 to 2**63 - 1")
    p.add_argument("--skip-check", action="store_true", help="skip the backend check (section 1)")
    p.add_argument("--skip-bench", action="store_true", help="skip the benchmarks (section 4)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (ours and transformers' own, on standard error)")


def train_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``prefix-attn train`` (:mod:`prefix_attn.train`)."""
    positive, count = cli_args.int_at_least(1), cli_args.int_at_least(0)
    p.add_argument("data", help="training data: .jsonl/.json ({'text'} or {'prompt','completion'} "
                                "per line, or a .json array of them, each with an optional 'prefix' name) "
                                "or plain text, one example a line")
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="output folder (checkpoint, log, adapter or adapters/NAME and bank, base model)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="local HF model folder (default: the built-in tiny Llama, saved to DIR/base_model)")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out file (default: --eval-fraction of data)")
    p.add_argument("--eval-fraction", type=cli_args.float_where(lambda f: 0 <= f < 1, "in [0, 1)"), default=0.1,
                   metavar="F", help="share of the data held out for the eval loss, without --eval-data "
                                     "(none with --eval-every 0: every example trains)")
    p.add_argument("--name", type=prefix_name, default="default",
                   help="prefix name (the bank entry) of the examples that name none ('prefix')")
    p.add_argument("--num-virtual-tokens", type=positive, default=20, metavar="P",
                   help="prefix length P (positions the text may use: the model's less P)")
    p.add_argument("--projection-hidden-size", type=positive, default=None, metavar="N",
                   help="train through an MLP of this width (folded into K/V at save; default: none)")
    p.add_argument("--epochs", type=positive, default=None, metavar="N",
                   help="passes over the training data (default: 1; ignored with --max-steps)")
    p.add_argument("--max-steps", type=positive, default=None, metavar="N",
                   help="the number of steps in total, as in HF Trainer: it overrides --epochs, the data "
                        "is cycled in further epochs as needed (default: --epochs' worth)")
    p.add_argument("--batch-size", type=positive, default=8, metavar="N",
                   help="examples per forward (a step takes N x --gradient-accumulation-steps)")
    p.add_argument("--gradient-accumulation-steps", type=positive, default=1, metavar="K",
                   help="micro-batches of --batch-size per step, as in HF Trainer: a step learns from the "
                        "examples --batch-size N*K would draw, the loss weighted by tokens over them all "
                        "(the memory of one micro-batch)")
    p.add_argument("--lr", type=cli_args.float_where(lambda v: 0 < v <= 1e6, "in (0, 1e6]"), default=1e-2,
                   help="AdamW learning rate")
    p.add_argument("--lr-scheduler", choices=list(train_schedule.SCHEDULERS), default="constant",
                   help="the rate after the warm-up, as HF Trainer's: constant (--lr), or from --lr down to 0 "
                        "at the run's end, linearly or along half a cosine (a resumed run must keep its "
                        "total steps)")
    p.add_argument("--warmup-steps", type=count, default=0, metavar="N",
                   help="raise the rate linearly from 0 to --lr over the first N steps (with linear or "
                        "cosine: fewer than the run's steps)")
    p.add_argument("--max-grad-norm", type=cli_args.float_where(lambda v: v > 0, "> 0"), default=None,
                   metavar="X", help="clip the prefix's gradient norm to X (default: no clipping); a norm "
                                     "that is not finite stops the run")
    p.add_argument("--weight-decay", type=cli_args.float_where(lambda v: v >= 0, ">= 0"), default=0.0, metavar="WD",
                   help="AdamW weight decay")
    p.add_argument("--max-length", type=cli_args.int_at_least(2), default=None, metavar="N",
                   help=f"tokens per example, longer ones cut (default: {DEFAULT_MAX_LENGTH}; at most the "
                        f"model's positions less --num-virtual-tokens: lowered to fit, with a note when N was given)")
    p.add_argument("--eval-every", type=count, default=50, metavar="N",
                   help="eval loss every N steps and at the end (0: no eval): with 0 no data is held out")
    p.add_argument("--save-every", type=count, default=50, metavar="N",
                   help="checkpoint every N steps (0: only at the end and when stopped by a signal)")
    p.add_argument("--save-best", action="store_true",
                   help="each evaluation of the lowest eval loss so far writes its step's prefixes to "
                        "OUTPUT/best (adapter, or adapters/NAME and bank; OUTPUT/adapter stays the last "
                        "step's); needs an eval loss")
    p.add_argument("--early-stopping-patience", type=positive, default=None, metavar="N",
                   help="stop (exit 0, the checkpoint and results written as at the end) after N "
                        "evaluations in a row that do not lower the best eval loss by more than "
                        "--early-stopping-threshold, as HF's EarlyStoppingCallback (default: never)")
    p.add_argument("--early-stopping-threshold", type=cli_args.float_where(lambda v: v >= 0, ">= 0"),
                   default=None, metavar="X",
                   help="with --early-stopping-patience: the least fall of the best eval loss that counts as "
                        "an improvement (default: 0, any fall)")
    p.add_argument("--seed", type=cli_args.seed, default=0,
                   help="seeds the batch order, the eval split, the prefix initialisation and, without "
                        "--model, the built-in random base model (then pass `--model OUTPUT/base_model` "
                        "to prefix-attn generate); -2**63 to 2**63 - 1")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:1, ... (default: cpu, with a note when CUDA is available)")
    p.add_argument("--dist-backend", choices=("nccl", "gloo"), default=None,
                   help="under torchrun (WORLD_SIZE > 1): the torch.distributed backend (default: nccl with "
                        "--device cuda, gloo on the CPU); ignored in a single process")
    p.add_argument("--dtype", choices=sorted(TRAIN_DTYPES), default="float32",
                   help="dtype of the frozen base model; the prefix is trained in float32 whatever it is "
                        "(bfloat16: half the base's memory; no float16: it would need loss scaling)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, slower)")
    p.add_argument("--pack", action="store_true",
                   help="pack each batch into one row without padding (same loss, no padded tokens)")
    p.add_argument("--chat", action="store_true",
                   help="render each example with the tokenizer's chat template, as generate --chat does "
                        "(.jsonl/.json: {'prompt','completion'} is [user, assistant]; or {'messages'} ending "
                        "in the assistant message learnt); the loss is on that assistant turn only (see --chat-turns)")
    p.add_argument("--chat-turns", choices=("last", "all", "each"), default="last",
                   help="with --chat, the assistant turns of a {'messages'} example learnt: last (the default: "
                        "the earlier ones are context), all (every one, in one pass over the conversation; "
                        "each checked to be what generate --chat feeds and answers up to it, else refused) "
                        "or each (every one, in a row of its own: the conversation up to it, as last renders "
                        "it; sound on every template, the shared context computed once per turn; batches "
                        "and --eval-fraction count rows)")
    p.add_argument("--chat-option", action="append", default=[], type=cli_args.chat_option, metavar="KEY=VALUE",
                   help="a variable of the chat template, with --chat (e.g. enable_thinking=false; the value "
                        "read as JSON, else as text; repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoint.pt (same settings; --max-steps/--epochs may grow, "
                        "except under a linear or cosine --lr-scheduler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def prefix_name(text: str) -> str:
    """An argparse ``type``: a prefix name (not empty, not only blanks, no "=": ``prefix-attn
    generate --adapter NAME=DIR`` could not serve it)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"the prefix name must not be empty, got {text!r}")
    if "=" in text:
        raise argparse.ArgumentTypeError(
            f"the prefix name {text!r} holds '=': `prefix-attn generate --adapter NAME=DIR` "
            "splits at the first '=' and could not serve it; use another character")
    return text


def _prefix_arguments(p: argparse.ArgumentParser) -> None:
    """The model, its prefix sources and the chat template: generate's and serve's."""
    _source_arguments(p)
    p.add_argument("--chat", action="store_true",
                   help="render with the tokenizer's chat template: a --prompt-prefix is the system "
                        "message, a request's prompt (or \"messages\") the user turn(s)")
    p.add_argument("--chat-option", action="append", default=[], type=cli_args.chat_option, metavar="KEY=VALUE",
                   help="a variable of the chat template, with --chat (e.g. enable_thinking=false; the value "
                        "read as JSON, else as text; repeatable)")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None, metavar="NAME",
                   help="with --chat, parse the tool calls in the answer of a request giving \"tools\" into "
                        "OpenAI's \"tool_calls\" (finish_reason \"tool_calls\"): hermes (<tool_call> blocks: "
                        "Qwen, Hermes), llama3_json (Llama 3.1/3.2's JSON), mistral ([TOOL_CALLS] [...], or "
                        "v11+'s [TOOL_CALLS]name[ARGS]{...}); "
                        "default: none, the answer is content")


def _source_arguments(p: argparse.ArgumentParser) -> None:
    """The model and its prefix sources: generate's, serve's and eval's."""
    p.add_argument("--model", default=None, metavar="DIR",
                   help="local HF model folder (default: the built-in tiny model, random weights)")
    p.add_argument("--bank", default=None, metavar="DIR",
                   help="a folder written by PrefixBank.save: its entries are prefixes (default: none)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a PEFT prefix-tuning adapter folder, served as prefix NAME (repeatable)")
    p.add_argument("--prompt-prefix", action="append", default=[], metavar="NAME=TEXT",
                   help="a shared prompt whose KV is computed once and served as prefix NAME (repeatable)")


def _decoding_arguments(p: argparse.ArgumentParser) -> None:
    """How tokens are picked, the seed, the device and the dtype: generate's and serve's (a
    request's fields of the same names override them, :mod:`prefix_attn.serve_options`)."""
    p.add_argument("--max-new-tokens", type=DECODING_TYPES["max_new_tokens"], default=32, metavar="N",
                   help="tokens generated per request at most")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=DECODING_TYPES["temperature"], default=1.0,
                   metavar="T", help="sampling temperature (with --do-sample)")
    p.add_argument("--top-p", type=DECODING_TYPES["top_p"], default=1.0,
                   metavar="P", help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--top-k", type=DECODING_TYPES["top_k"], default=0, metavar="K",
                   help="sample among the K likeliest tokens only (with --do-sample; 0 = all tokens, "
                        "not transformers' 50)")
    p.add_argument("--min-p", type=DECODING_TYPES["min_p"], default=0.0,
                   metavar="P", help="sample only tokens at least P times as likely as the likeliest "
                                     "(with --do-sample; 0 = off)")
    p.add_argument("--repetition-penalty", type=DECODING_TYPES["repetition_penalty"], default=1.0,
                   metavar="R", help="divide the positive scores (multiply the negative ones) of the tokens "
                                     "already in the prompt or the completion by R, greedy, sampled or beams "
                                     "(1 = off; a prefix's tokens are not counted)")
    p.add_argument("--stop", action="append", default=[], type=DECODING_TYPES["stop"], metavar="TEXT",
                   help="end a completion at the first TEXT it holds, TEXT left out (repeatable)")
    p.add_argument("--num-beams", type=DECODING_TYPES["num_beams"], default=1, metavar="N",
                   help="beam search width (1 = no beam search)")
    p.add_argument("--seed", type=cli_args.seed, default=0, help="torch seed (sampling), -2**63 to 2**63 - 1")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(GENERATE_DTYPES), default="float32", help="model and prefix dtype")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefix-attn generate`` (:mod:`prefix_attn.serve`)."""
    _prefix_arguments(p)
    p.add_argument("--input", "-i", required=True, metavar="FILE", help="JSONL requests file ('-' = stdin)")
    p.add_argument("--output", "-o", required=True, metavar="FILE",
                   help="JSONL results file ('-' = stdout); written whole at the end, folders created")
    p.add_argument("--batch-size", type=cli_args.int_at_least(1), default=8, metavar="N",
                   help="requests per model.generate call")
    _decoding_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def serve_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefix-attn serve`` (:mod:`prefix_attn.serve_http`)."""
    _prefix_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=cli_args.int_at_least(0, 65535), default=8000,
                   help="port to listen on (0: any free port, said on stderr)")
    p.add_argument("--batch-size", type=cli_args.int_at_least(1), default=8, metavar="N",
                   help="rows per model.generate call at most (a request's choices, prompts x n, are rows)")
    p.add_argument("--batch-wait-ms", type=cli_args.float_where(lambda v: 0 <= v <= 60000, "in [0, 60000]"),
                   default=5.0, metavar="MS",
                   help="after a request comes, wait this long for others to batch with it")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="every /v1/ request and /metrics must carry 'Authorization: Bearer KEY' (else 401); default: "
                        "$PREFIX_ATTN_API_KEY, else none (every request served)")
    p.add_argument("--request-timeout", type=cli_args.float_where(lambda v: 0 < v <= 3600, "in (0, 3600]"),
                   default=10.0, metavar="S",
                   help="seconds a client has to send its request: each read of its headers, its whole body "
                        "(else 408)")
    p.add_argument("--max-connections", type=cli_args.int_at_least(1), default=256, metavar="N",
                   help="connections served at once; one more is answered 503 at once")
    _decoding_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no line on stderr per request")


NO_PREFIX = "none"  # eval's --prefix for the base model without a prefix


def eval_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``prefix-attn eval`` (:mod:`prefix_attn.evaluate`)."""
    p.add_argument("data", help="held-out data, read as train reads its data (.jsonl/.json or plain text; "
                                "a JSON example's 'prefix' names the prefix it is scored under)")
    _source_arguments(p)
    p.add_argument("--prefix", action="append", default=[], type=prefix_name, metavar="NAME",
                   help=f"score the examples that name no prefix under NAME ({NO_PREFIX}: the base model "
                        "without a prefix; repeatable: each example under each; default: the one prefix "
                        f"given, or {NO_PREFIX} when none is)")
    p.add_argument("--batch-size", type=cli_args.int_at_least(1), default=8, metavar="N",
                   help="examples per forward, batched by length (train's --batch-size: the same batches "
                        "as its eval loss)")
    p.add_argument("--max-length", type=cli_args.int_at_least(2), default=None, metavar="N",
                   help=f"tokens per example, longer ones cut (default: {DEFAULT_MAX_LENGTH}, or the model's "
                        "positions less the longest prefix scored when fewer; a larger N is an error)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(GENERATE_DTYPES), default="float32", help="model and prefix dtype")
    p.add_argument("--chat", action="store_true",
                   help="render each example with the tokenizer's chat template, as train --chat does; "
                        "the loss on the assistant turn(s) it learns (see --chat-turns)")
    p.add_argument("--chat-option", action="append", default=[], type=cli_args.chat_option, metavar="KEY=VALUE",
                   help="a variable of the chat template, with --chat (repeatable)")
    p.add_argument("--chat-turns", choices=("last", "all", "each"), default="last",
                   help="with --chat, the assistant turns scored, as train's --chat-turns")
    p.add_argument("--output", "-o", default=None, metavar="FILE",
                   help="also write the numbers per prefix to FILE as JSON (written whole or not at all)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# name -> (module running it, one-line help, its arguments)
COMMANDS = {
    "check": ("prefix_attn.check", "check every available backend against the reference", check_arguments),
    "demo": ("prefix_attn.demo", "the whole story in a few minutes: check, train, serve, benchmark",
             demo_arguments),
    "train": ("prefix_attn.train", "prefix-tune a model on a text/JSONL file", train_arguments),
    "generate": ("prefix_attn.serve", "answer a JSONL file of requests with per-row prefixes",
                 generate_arguments),
    "serve": ("prefix_attn.serve_http", "an OpenAI-compatible HTTP server, a prefix per request",
              serve_arguments),
    "eval": ("prefix_attn.evaluate", "the loss of a data file under each prefix, without training",
             eval_arguments),
}


def add_parser(subparsers, name: str, func: Optional[Callable] = None) -> argparse.ArgumentParser:
    """Add command ``name`` to ``subparsers``; ``func`` (default: its module's ``run``, imported
    when called) is set as the parsed arguments' ``func``."""
    module, help_text, arguments = COMMANDS[name]
    p = subparsers.add_parser(name, help=help_text, description=module_doc(module),
                              formatter_class=cli_args.HelpFormatter)
    arguments(p)
    p.set_defaults(func=func if func is not None else LazyRun(module))
    return p
