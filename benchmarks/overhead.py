"""What does putting the gateway in front of vLLM cost? `student bench overhead`.

    student bench overhead [--requests N] [--max-tokens T] [--out FILE.json]

One vLLM (tiny random Llama) and three gateways in front of it: telemetry off, telemetry on
(power source detected as in production) and on + meter (the energy meter on a steady stand-in
source, so vLLM sends running usage on every chunk, as on a GPU machine). The same workload goes
to vLLM directly and through each gateway, in blocks that alternate A/B/A/B (the order rotates
every round), at concurrency 1 and 8. Closed loop: each of the C workers sends its next request
when the previous one ended, so throughput is what the pair (vLLM + gateway) sustains on this
machine, where the gateway's CPU is taken from vLLM.

Reported per gateway and concurrency, next to the issue's goals (reported, never asserted):

- throughput ratio gateway / direct, requests/s and output tokens/s (sum over the blocks);
- added time to first token: gateway p50 (p99) minus direct p50 (p99), first streamed event;
- the gateway's CPU per request: utime + stime of its pid from /proc/<pid>/stat over its blocks;
- inter-token timing: a deterministic request (greedy, ignore_eos) answered with the same
  number of events and the same text as direct, and no reads holding more than one event
  where direct had none (the gateway does not batch events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.telemetry import (
    DIRECT,
    GW_METER,
    GW_OFF,
    GW_ON,
    Sample,
    Services,
    Target,
    build_tiny_model,
    check_tokens,
    energy_status,
    environment,
    fmt,
    one_request,
    prompts,
    request_body,
    rotated,
    say,
    start_stack,
    table,
)
from server.telemetry.percentiles import percentile

CONCURRENCIES = (1, 8)
ROUNDS = 4
GOALS = {
    "throughput_ratio": {1: 0.98, 8: 0.90},  # gateway / direct, at least
    "added_ttft_p50_ms": 2.0,  # at most
    "cpu_ms_per_request": 7.0,  # at most, telemetry on
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """utime + stime of one process (not its children), seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# --- load -------------------------------------------------------------------------------------


@dataclass
class Block:
    """One target's turn in one round: `requests` sent by `concurrency` workers, closed loop."""

    target: str
    concurrency: int
    round: int
    requests: int
    errors: int
    wall_s: float
    cpu_s: float | None


async def run_block(
    session: aiohttp.ClientSession, target: Target, bodies: list[dict[str, Any]], concurrency: int, round_index: int
) -> tuple[Block, list[Sample]]:
    jobs = iter(bodies)
    samples: list[Sample] = []
    phase = f"c{concurrency}"

    async def worker() -> None:
        for body in jobs:
            samples.append(await one_request(session, target, body, phase, round_index))

    pid = target.service.process.pid if target.service else None
    cpu0 = proc_cpu_s(pid) if pid else None
    wall0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.perf_counter() - wall0
    cpu_s = proc_cpu_s(pid) - cpu0 if pid and cpu0 is not None else None
    errors = sum(s.error is not None for s in samples)
    return Block(target.name, concurrency, round_index, len(samples), errors, wall_s, cpu_s), samples


async def run_level(
    session: aiohttp.ClientSession, targets: list[Target], chats: list, concurrency: int, per_block: int, max_tokens: int
) -> tuple[list[Block], list[Sample]]:
    blocks: list[Block] = []
    samples: list[Sample] = []
    for round_index in range(ROUNDS):
        # Every target gets the same prompts in the same round.
        bodies = [request_body(chats[(round_index * per_block + i) % len(chats)], max_tokens) for i in range(per_block)]
        for target in rotated(targets, round_index):
            block, mine = await run_block(session, target, bodies, concurrency, round_index)
            blocks.append(block)
            samples.extend(mine)
        say(f"  concurrency {concurrency}: round {round_index + 1}/{ROUNDS} done ("
            + ", ".join(f"{b.target} {b.requests / b.wall_s:.2f} req/s" for b in blocks[-len(targets):]) + ")")
    return blocks, samples


@dataclass
class StreamShape:
    """A deterministic request's stream as one client saw it."""

    events: int
    text: str
    reads: int
    multi_event_reads: int


async def stream_shape(session: aiohttp.ClientSession, target: Target, body: dict[str, Any]) -> StreamShape:
    """Read with `iter_any` (each read as it arrives) and count events and reads holding > 1 event."""
    events = reads = multi = 0
    text: list[str] = []
    pending = b""
    async with session.post(target.url + "/v1/chat/completions", json=body) as response:
        async for chunk in response.content.iter_any():
            reads += 1
            complete = (pending + chunk).count(b"\n\n")
            multi += complete > 1
            pending = (pending + chunk).rsplit(b"\n\n", 1)[-1]
            for line in chunk.split(b"\n"):
                if not line.startswith(b"data: "):
                    continue
                events += 1
                if line.startswith(b'data: {"'):
                    for choice in json.loads(line[6:]).get("choices") or []:
                        text.append((choice.get("delta") or {}).get("content") or "")
    return StreamShape(events, "".join(text), reads, multi)


async def check_stream_shapes(
    session: aiohttp.ClientSession, targets: list[Target], body: dict[str, Any], repeats: int = 3
) -> dict[str, list[StreamShape]]:
    shapes: dict[str, list[StreamShape]] = {t.name: [] for t in targets}
    for repeat in range(repeats):
        for target in rotated(targets, repeat):
            shapes[target.name].append(await stream_shape(session, target, body))
    return shapes


# --- analysis (pure) --------------------------------------------------------------------------


def summarize(blocks: list[Block], samples: list[Sample], names: list[str], max_tokens: int) -> dict[str, Any]:
    """Per target: throughput, TTFT percentiles, gateway CPU per request; ratios over direct."""
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        mine = [b for b in blocks if b.target == name]
        ok = [s for s in samples if s.target == name and s.error is None]
        wall_s = sum(b.wall_s for b in mine)
        requests = sum(b.requests for b in mine)
        good = requests - sum(b.errors for b in mine)
        cpu = [b.cpu_s for b in mine if b.cpu_s is not None]
        ttft_ms = [s.ttft_s * 1e3 for s in ok]
        streamed = [s for s in ok if not late_first_event(s)]
        rows[name] = {
            "requests": requests,
            "errors": requests - good,
            "wall_s": wall_s,
            "requests_per_s": good / wall_s if wall_s else None,
            "output_tokens_per_s": good * max_tokens / wall_s if wall_s else None,
            "ttft_ms_p50": percentile(ttft_ms, 50),
            "ttft_ms_p99": percentile(ttft_ms, 99),
            "e2e_ms_p50": percentile([s.e2e_s * 1e3 for s in ok], 50),
            "late_first_event_share": (len(ok) - len(streamed)) / len(ok) if ok else None,
            "ttft_ms_p50_streamed": percentile([s.ttft_s * 1e3 for s in streamed], 50),
            "cpu_ms_per_request": sum(cpu) * 1e3 / requests if cpu and requests else None,
            "block_requests_per_s": [b.requests / b.wall_s for b in mine],
        }
    direct = rows[DIRECT]
    for name in names:
        if name == DIRECT:
            continue
        row = rows[name]
        row["throughput_ratio_requests"] = _ratio(row["requests_per_s"], direct["requests_per_s"])
        row["throughput_ratio_tokens"] = _ratio(row["output_tokens_per_s"], direct["output_tokens_per_s"])
        row["added_ttft_ms_p50"] = _minus(row["ttft_ms_p50"], direct["ttft_ms_p50"])
        row["added_ttft_ms_p99"] = _minus(row["ttft_ms_p99"], direct["ttft_ms_p99"])
        row["added_ttft_ms_p50_streamed"] = _minus(row["ttft_ms_p50_streamed"], direct["ttft_ms_p50_streamed"])
    return rows


def late_first_event(sample: Sample) -> bool:
    """The answer's first event came after half its time: vLLM's API server fell behind and sent
    the stream as one late burst (on a busy 2-core box it does, for direct clients too), so its
    TTFT measures CPU scheduling, not streaming."""
    return sample.ttft_s > sample.e2e_s / 2


def shapes_verdict(shapes: dict[str, list[StreamShape]]) -> dict[str, dict[str, Any]]:
    """Per gateway: same events and text as direct, and no more multi-event reads than direct."""
    direct = shapes[DIRECT]
    verdicts = {}
    for name, mine in shapes.items():
        if name == DIRECT:
            continue
        same = all(a.events == b.events and a.text == b.text for a in mine for b in direct)
        direct_multi = max(s.multi_event_reads for s in direct)
        batched = max(s.multi_event_reads for s in mine) > direct_multi
        verdicts[name] = {
            "events": [s.events for s in mine],
            "direct_events": [s.events for s in direct],
            "same_events_and_text": same,
            "multi_event_reads": [s.multi_event_reads for s in mine],
            "direct_multi_event_reads": [s.multi_event_reads for s in direct],
            "more_multi_event_reads_than_direct": batched,
            # A read holding several events also happens direct when vLLM's API server falls behind
            # on a busy 2-core box, so multi-event reads are reported, and the verdict is the count.
            "preserved": same,
        }
    return verdicts


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _percent(share: float | None) -> str:
    return "–" if share is None else f"{100 * share:.0f}%"


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def goal_lines(levels: dict[int, dict[str, Any]], verdicts: dict[str, dict[str, Any]]) -> list[list[str]]:
    """Rows of the report: what, gateway, concurrency, value, goal, pass."""

    def check(value: float | None, goal: float, at_least: bool) -> str:
        if value is None or math.isnan(value):
            return "–"
        return "pass" if (value >= goal if at_least else value <= goal) else "MISS"

    rows = []
    for concurrency, result in levels.items():
        for name, row in result.items():
            if name == DIRECT:
                continue
            tag = f"c={concurrency}"
            ratio_goal = GOALS["throughput_ratio"].get(concurrency)
            for key, label in (("throughput_ratio_requests", "throughput ratio, requests/s"),
                               ("throughput_ratio_tokens", "throughput ratio, output tokens/s")):
                value = row[key]
                rows.append([label, name, tag, fmt(value, 3), f"≥ {ratio_goal:.2f}" if ratio_goal else "–",
                             check(value, ratio_goal, True) if ratio_goal else "–"])
            value = row["added_ttft_ms_p50"]
            rows.append(["added TTFT p50, ms", name, tag, fmt(value, 2, sign=True),
                         f"≤ {GOALS['added_ttft_p50_ms']:g}", check(value, GOALS["added_ttft_p50_ms"], False)])
            rows.append(["added TTFT p99, ms", name, tag, fmt(row["added_ttft_ms_p99"], 2, sign=True), "–", "–"])
            rows.append(["added TTFT p50, streamed answers only, ms", name, tag,
                         fmt(row["added_ttft_ms_p50_streamed"], 2, sign=True), "(info)", "–"])
            value = row["cpu_ms_per_request"]
            on = name == GW_ON
            rows.append(["gateway CPU per request, ms", name, tag, fmt(value, 2),
                         f"≤ {GOALS['cpu_ms_per_request']:g}" if on else "(info)",
                         check(value, GOALS["cpu_ms_per_request"], False) if on else "–"])
    for name, verdict in verdicts.items():
        events = "/".join(map(str, sorted(set(verdict["events"]))))
        direct = "/".join(map(str, sorted(set(verdict["direct_events"]))))
        multi = f"{max(verdict['multi_event_reads'])} vs {max(verdict['direct_multi_event_reads'])}"
        rows.append(["stream events per request (gw vs direct)", name, "c=1", f"{events} vs {direct}",
                     "same", "pass" if verdict["preserved"] else "MISS"])
        rows.append(["reads holding >1 event, max (gw vs direct)", name, "c=1", multi, "(info)", "–"])
    return rows


def report(results: dict[str, Any]) -> str:
    env = results["environment"]
    args = results["arguments"]
    lines = [
        f"Machine: {env['host']}, {env['cpus']} CPUs, {env['platform']}; Python {env['python']}, vLLM {env['vllm']}; "
        f"load average {env['loadavg_at_start'][0]:.2f} at start, {env['loadavg_at_end'][0]:.2f} at end",
        f"Workload: tiny random Llama on one vLLM; streamed chat, {args['max_tokens']} output tokens (greedy, "
        f"ignore_eos); {ROUNDS} rounds of alternating blocks per concurrency, {args['requests']} requests per "
        "target and concurrency. Gateway CPU: utime+stime of its pid (/proc).",
        "",
    ]
    for concurrency, result in results["levels"].items():
        rows = [
            [name, f"{r['requests'] - r['errors']}/{r['requests']}", fmt(r["requests_per_s"], 2),
             fmt(r["output_tokens_per_s"], 0), fmt(r["ttft_ms_p50"]), fmt(r["ttft_ms_p99"]), fmt(r["e2e_ms_p50"]),
             _percent(r["late_first_event_share"]), fmt(r["cpu_ms_per_request"], 2)]
            for name, r in result.items()
        ]
        lines += [f"concurrency {concurrency}",
                  table(["target", "ok", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "E2E p50 ms",
                         "late burst", "gw CPU ms/req"], rows), ""]
    lines.append(table(["measure", "gateway", "load", "value", "goal", "result"],
                       goal_lines(results["levels"], results["stream_shape"])))
    return "\n".join(lines)


# --- command ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=64,
                        help="requests per target and concurrency, split over 4 alternating rounds (default 64)")
    parser.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128)")
    parser.add_argument("--out", type=Path, default=Path("overhead-benchmark.json"),
                        help="results JSON (default ./overhead-benchmark.json)")


def run(args: argparse.Namespace) -> int:
    if args.requests < 1 or args.max_tokens < 1:
        print("student bench overhead: --requests and --max-tokens must be positive", file=sys.stderr)
        return 2
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up like Ctrl-C
    results: dict[str, Any] = {
        "environment": environment(),
        "arguments": {"requests": args.requests, "max_tokens": args.max_tokens, "rounds": ROUNDS},
        "goals": {k: ({str(c): g for c, g in v.items()} if isinstance(v, dict) else v) for k, v in GOALS.items()},
    }
    try:
        with tempfile.TemporaryDirectory(prefix="overhead-bench-") as tmp, Services(Path(tmp)) as services:
            say("building the tiny random Llama")
            model_dir = build_tiny_model(Path(tmp) / "tiny-model")
            targets = start_stack(services, Path(tmp), model_dir, max(CONCURRENCIES))
            results["energy"] = {t.name: energy_status(t) for t in targets if t.service}
            asyncio.run(_measure(args, targets, results))
            say("stopping the stack")
    except KeyboardInterrupt:
        say("interrupted; everything started was stopped")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        results["environment"]["loadavg_at_end"] = os.getloadavg()
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print("\n" + "=" * 100)
    print(report(results))
    say(f"results written to {args.out}")
    return 0


async def _measure(args: argparse.Namespace, targets: list[Target], results: dict[str, Any]) -> None:
    chats = prompts(64)
    names = [t.name for t in targets]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await check_tokens(session, targets, chats[0], args.max_tokens)
        say("stream shape: a deterministic request, 3 times per target")
        shapes = await check_stream_shapes(session, targets, request_body(chats[0], args.max_tokens))
        results["stream_shape"] = shapes_verdict(shapes)
        results["stream_shape_raw"] = {name: [asdict(s) for s in mine] for name, mine in shapes.items()}
        say("warm-up")
        for target in targets:
            await run_block(session, target, [request_body(chats[1], args.max_tokens)] * 2, 2, -1)
        results["levels"] = {}
        results["blocks"] = []
        for concurrency in CONCURRENCIES:
            per_block = max(concurrency, math.ceil(args.requests / ROUNDS / concurrency) * concurrency)
            say(f"concurrency {concurrency}: {ROUNDS} rounds × {len(targets)} targets × {per_block} requests")
            blocks, samples = await run_level(session, targets, chats, concurrency, per_block, args.max_tokens)
            results["levels"][concurrency] = summarize(blocks, samples, names, args.max_tokens)
            results["blocks"] += [asdict(b) for b in blocks]
