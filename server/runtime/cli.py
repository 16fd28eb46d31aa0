"""`student`: one command-line program, one subcommand per job.

Each subcommand lives in the module that does the job and exposes `add_arguments(parser)` and
`run(args) -> exit code`. Only the chosen subcommand's module is imported, so `student --help`
does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.runtime.serve", "run vLLM and the measuring gateway (demo student if no --model)"),
    "merge": ("models.merge", "merge a LoRA adapter into its base model and verify the result"),
    "base-model": ("models.base_model", "convert (or reuse) the pretrained base, SmolLM2-135M-Instruct, offline"),
    "demo-model": ("models.demo", "build (or reuse) the embedded demo student"),
    "distill": ("models.distill.command", "training data from an OpenAI-compatible teacher: response, cot, multitask (resumable)"),
    "dataset": ("models.dataset_check", "check a chat JSONL dataset for training and split it: student dataset check"),
    "train-lora": ("models.train_lora", "LoRA fine-tune a base model on chat JSONL (loss on assistant turns)"),
    "report": ("server.accounting.ledger_report", "daily table of requests, tokens, kWh, electricity and API-equivalent cost from the ledger"),
    "load": ("loadtest.cli", "Locust scenarios: daily, capacity, soak, burst against a running gateway"),
    "bench": ("benchmarks.cli", "measure the gateway's own cost: student bench overhead"),
}


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
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
