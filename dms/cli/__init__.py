"""The ``dms`` command line. Each subcommand lives in its own module, imported on use so
that ``dms --help`` stays fast.

Expected errors (bad input, a missing folder, a checkpoint that is not a DMS one, a full page
pool, an unsupported feature) end a command with one line on stderr and exit status 2;
``--debug`` or ``DMS_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args).
COMMANDS = {
    "generate": ("dms.cli.generate", "generate text with a DMS model, streaming tokens"),
    "retrofit": ("dms.cli.retrofit", "train a plain model into a DMS model"),
    "eval": ("dms.cli.eval", "evaluate methods and budgets on the synthetic tasks"),
    "bench": ("dms.cli.bench", "decode speed and KV memory, DMS vs dense cache"),
    "demo": ("dms.cli.demo", "the main job: evaluate the shipped models offline"),
    "hyperscale": ("dms.cli.hyperscale", "accuracy of W sampled chains vs KV memory and reads, vanilla vs DMS"),
    "retention": ("dms.cli.retention", "heat map of the tokens each head of a DMS model kept, for one sample"),
    "compare": ("dms.cli.compare", "paired comparison of two dms eval results on the same seeds"),
}

# Errors that mean "the input is wrong or unsupported", not "dms has a bug" (DMSConfigError and
# huggingface_hub's validation errors are ValueErrors; DMSCacheFullError is matched by name so
# that dms.cache, which imports transformers, is not loaded for every command).
EXPECTED = (ValueError, TypeError, OSError, NotImplementedError, ImportError)
EXPECTED_NAMES = {"DMSCacheFullError"}
# Parsed arguments that name a model: a local folder or a hub id.
MODEL_ARGS = ("model", "base")
EXIT_ERROR = 2
DESCRIPTION = """Dynamic Memory Sparsification: learned, delayed KV-cache eviction.
`dms COMMAND --help` describes each command. An expected error (bad input, a missing folder, a
checkpoint that is not a DMS one, a full page pool) ends a command with one line on stderr and
exit status 2; --debug or DMS_DEBUG=1 shows its traceback."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _debug_requested(args) -> bool:
    return getattr(args, "debug", False) or os.environ.get("DMS_DEBUG", "") not in ("", "0")


def _hub_models(args) -> list[str]:
    """The model arguments that are not local paths, so name hub models. One that is not a valid
    hub id either is a missing folder: said here, it does not reach huggingface_hub as a
    malformed repo id."""
    values = [getattr(args, name) for name in MODEL_ARGS if isinstance(getattr(args, name, None), str)]
    values += [path for _, path in getattr(args, "dms", None) or []]
    hub = []
    for value in values:
        if os.path.exists(value):
            continue
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(value)
        except HFValidationError:
            raise FileNotFoundError(f"no such folder: {value}") from None
        hub.append(value)
    return hub


def _raised_in(error: BaseException, packages: tuple[str, ...]) -> bool:
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
    return any(f"/{p}/" in path for p in packages)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="dms", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "show the full traceback of an error (also: DMS_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        # SUPPRESS: without --debug after the subcommand, the top-level value stands.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    args = parser.parse_args(argv)
    hub = []
    try:
        hub = _hub_models(args)
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if _debug_requested(args):
            raise
        print(f"dms {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        expected = isinstance(e, EXPECTED) or any(c.__name__ in EXPECTED_NAMES for c in type(e).__mro__)
        if not expected or _debug_requested(args):
            raise
        message = _one_line(e)
        if hub and isinstance(e, OSError) and _raised_in(e, ("transformers", "huggingface_hub")):
            message = f"{' and '.join(hub)}: no such folder, and as a hub model: {message}"
        print(f"dms {args.command}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
