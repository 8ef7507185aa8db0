"""The ``dms`` command line. Each subcommand lives in its own module, imported on use so
that ``dms --help`` stays fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module defines add_arguments(parser) and run(args).
COMMANDS = {
    "generate": ("dms.cli.generate", "generate text with a DMS model, streaming tokens"),
    "retrofit": ("dms.cli.retrofit", "train a plain model into a DMS model"),
    "eval": ("dms.cli.eval", "evaluate methods and budgets on the synthetic tasks"),
    "bench": ("dms.cli.bench", "decode speed and KV memory, DMS vs dense cache"),
    "demo": ("dms.cli.demo", "the main job: evaluate the shipped models offline"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
