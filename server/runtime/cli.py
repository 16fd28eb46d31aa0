"""`student`: the one command-line program; every package registers its commands here.

Each top-level package lists its commands in its own `commands.py` (`COMMANDS`: name -> (module,
help)); this module collects them, in `PACKAGES` order. A command's module does the job and
exposes `add_arguments(parser)` and `run(args) -> exit code`. Only the chosen command's module is
imported, so `student --help` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

PACKAGES = ("server", "models", "loadtest", "benchmarks")
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader left


def registered_commands() -> dict[str, tuple[str, str]]:
    """Every package's commands: name -> (module, help); a name registered twice is a bug."""
    commands: dict[str, tuple[str, str]] = {}
    for package in PACKAGES:
        for name, entry in importlib.import_module(f"{package}.commands").COMMANDS.items():
            if name in commands:
                raise RuntimeError(f"command {name!r} is registered by {commands[name][0]} and {entry[0]}")
            commands[name] = entry
    return commands


COMMANDS = registered_commands()


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The full parser; only `command`'s own arguments are loaded."""
    parser = argparse.ArgumentParser(prog="student", description="Serve and measure a distilled student LLM.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module_name).add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # e.g. `student report | head`: the reader left, which is no error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
