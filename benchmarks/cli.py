"""`student bench`: benchmarks of the gateway itself. Each is a module with `add_arguments` and `run`."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS: dict[str, tuple[str, str]] = {
    "overhead": ("benchmarks.overhead", "vLLM direct vs through the gateway: throughput, added TTFT, gateway CPU"),
    "telemetry": ("benchmarks.telemetry_cost", "what telemetry costs: the energy sampler's CPU, latency on vs off"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(subparser)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark][0]).run(args)
