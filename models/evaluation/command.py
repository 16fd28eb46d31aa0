"""`student eval`: answer the held-out eval set with one or more targets, score, price and judge.

    student eval --target student=http://127.0.0.1:8000 --target base=http://127.0.0.1:8001 \\
        --target teacher=https://api.openai.com/v1 --model teacher=gpt-4.1 \\
        --api-key-env teacher=OPENAI_API_KEY --price teacher=gpt-4.1 \\
        --judge https://api.openai.com/v1 --judge-model gpt-4.1 --judge-api-key-env OPENAI_API_KEY \\
        --min-fact-recall 0.8 --min-win-rate 0.4

The first target is the candidate: the gates apply to it. Targets are answered one after the
other (so a gateway's energy counters see only its own target's requests, and one target's load
does not slow another's latency), then the judge compares every answer with the reference. The
scores are defined in `models.evaluation.scoring` and `models.evaluation.judging`, the cost in
`models.evaluation.cost`. Exit status: 0 all gates hold, 1 a gate failed, 2 the eval could not
run (bad flag or eval set, unreachable target); on 2 no report folder is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.arguments import non_negative_float, positive_int
from models.distill.teacher import TeacherClient, TeacherRejectedError
from models.evaluation.answering import Target, answer_items, api_base, client_error_text, resolve_model
from models.evaluation.cost import fetch_stats, gateway_energy, not_measured, parse_price, token_cost
from models.evaluation.errors import EvalError
from models.evaluation.eval_set import DEFAULT_EVAL_SET, EvalItem, choose_subset, load_eval_set, topics_in_order
from models.evaluation.gates import EXIT_CANNOT_RUN, EXIT_GATE_FAILED, EXIT_PASSED, GATES, Gate, check_gates
from models.evaluation.judging import DEFAULT_JUDGE_MAX_TOKENS, VERDICT_SCHEMA, Judge, JudgeTally
from models.evaluation.report import DEFINITIONS, REPORT_FORMAT, REPORT_MD, check_out, publish_report
from models.evaluation.results import ScoredAnswer, TargetRun, score_answer

DEFAULT_MAX_TOKENS = 160
DEFAULT_CONCURRENCY = 4
LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student eval`."""
    parser.description = (
        "Answer a held-out eval set with each target (OpenAI-compatible servers) and report, per target: fact "
        "recall, exact-answer rate, chrF, empty/refusal/not-Vietnamese shares, latency, tokens, cost per 1,000 "
        "answers (measured energy behind a student-serve gateway, tokens × --price elsewhere) and, with --judge, "
        "a blind both-orders comparison with the reference answers. Exit 0: gates passed, 1: a gate failed on "
        "the first target, 2: could not run."
    )
    targets = parser.add_argument_group("targets (LABEL names a target in the per-target options)")
    targets.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="LABEL=URL",
        help="an OpenAI-compatible server, root or …/v1; repeat for several; the first is the candidate",
    )
    targets.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="LABEL=NAME",
        help="model to ask for (default: the first id of the target's GET /v1/models)",
    )
    targets.add_argument(
        "--api-key-env",
        action="append",
        default=[],
        metavar="LABEL=VAR",
        help="environment variable holding the target's API key (sent as a Bearer token)",
    )
    targets.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="LABEL=IN,OUT|NAME",
        help="token price, USD per 1M input,output tokens (or one number for both), or an API of the price table "
        "(gpt-4.1, claude-sonnet-4.5, deepseek-v3.2): cost = tokens × price",
    )

    run = parser.add_argument_group("the run")
    run.add_argument(
        "--eval-set",
        type=Path,
        default=DEFAULT_EVAL_SET,
        metavar="FILE",
        help="eval JSONL (default: the bundled models/data/eval_set.jsonl)",
    )
    run.add_argument(
        "--limit",
        type=positive_int,
        metavar="N",
        help="only N items, round-robin over the topics in file order (deterministic)",
    )
    run.add_argument(
        "--max-tokens",
        type=positive_int,
        default=DEFAULT_MAX_TOKENS,
        metavar="N",
        help="max_tokens of each answer (default: %(default)s)",
    )
    run.add_argument(
        "--concurrency",
        type=positive_int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help="requests in flight per target and to the judge (default: %(default)s)",
    )
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="report folder, must not exist or be empty (default: eval-reports/<UTC time>)",
    )

    judge = parser.add_argument_group("judge (blind A/B against the reference answer, both orders)")
    judge.add_argument("--judge", metavar="URL", help="an OpenAI-compatible server to judge with")
    judge.add_argument("--judge-model", metavar="NAME", help="judge model (default: the first of its /v1/models)")
    judge.add_argument("--judge-api-key-env", metavar="VAR", help="environment variable holding the judge's API key")
    judge.add_argument(
        "--judge-max-tokens",
        type=positive_int,
        default=DEFAULT_JUDGE_MAX_TOKENS,
        metavar="N",
        help="max_tokens of each verdict (default: %(default)s; a reply cut short is an invalid verdict)",
    )

    gates = parser.add_argument_group("gates on the first target (exit 1 when one fails)")
    gates.add_argument("--min-fact-recall", type=non_negative_float, metavar="F", help="lowest fact recall, 0-1")
    gates.add_argument(
        "--min-vietnamese",
        type=non_negative_float,
        metavar="F",
        help="lowest share of answers that are non-empty and Vietnamese, 0-1",
    )
    gates.add_argument("--max-empty", type=non_negative_float, metavar="F", help="highest share of empty answers, 0-1")
    gates.add_argument(
        "--min-win-rate",
        type=non_negative_float,
        metavar="F",
        help="lowest judge win rate, (wins + ties/2) / judged; 0.5 = as good as the reference (needs --judge)",
    )


@dataclass(frozen=True)
class EvalPlan:
    """Everything `student eval` will do, checked before any request is sent."""

    targets: tuple[Target, ...]
    items: tuple[EvalItem, ...]
    items_total: int
    eval_set: Path
    topics: tuple[str, ...]
    limit: int | None
    max_tokens: int
    concurrency: int
    out: Path
    judge: Target | None
    judge_max_tokens: int
    thresholds: dict[str, float | None]


def pairs(values: Sequence[str], flag: str, labels: Sequence[str]) -> dict[str, str]:
    """`LABEL=VALUE` options as {label: value}; every label must name a target, once."""
    found: dict[str, str] = {}
    for text in values:
        label, sep, value = text.partition("=")
        if not sep or not value.strip():
            raise EvalError(f"{flag} {text!r}: expected LABEL=VALUE")
        if label not in labels:
            raise EvalError(f"{flag} {text!r}: no --target is labelled {label!r} (targets: {', '.join(labels)})")
        if label in found:
            raise EvalError(f"{flag} is given twice for {label!r}")
        found[label] = value.strip()
    return found


def api_key(variable: str, whose: str) -> str:
    key = os.environ.get(variable)
    if not key:
        raise EvalError(f"environment variable {variable} (API key of {whose}) is not set")
    return key


def plan_from_args(args: argparse.Namespace) -> EvalPlan:
    """Check every flag and the eval set; `EvalError` (one line) on the first problem."""
    targets: list[Target] = []
    for text in args.target:
        label, sep, url = text.partition("=")
        if not sep or not LABEL.match(label):
            raise EvalError(f"--target {text!r}: expected LABEL=URL with a label of letters, digits, _ . -")
        if any(target.label == label for target in targets):
            raise EvalError(f"--target label {label!r} is used twice")
        targets.append(Target(label, api_base(url)))
    labels = [target.label for target in targets]
    models = pairs(args.model, "--model", labels)
    keys = pairs(args.api_key_env, "--api-key-env", labels)
    prices = {label: parse_price(text) for label, text in pairs(args.price, "--price", labels).items()}
    targets = [
        replace(
            target,
            model=models.get(target.label),
            key_env=keys.get(target.label),
            api_key=api_key(keys[target.label], f"target {target.label}") if target.label in keys else None,
            price=prices[target.label][1] if target.label in prices else None,
            price_name=prices[target.label][0] if target.label in prices else None,
        )
        for target in targets
    ]
    judge = None
    if args.judge is None:
        for flag, value in (
            ("--judge-model", args.judge_model),
            ("--judge-api-key-env", args.judge_api_key_env),
            ("--min-win-rate", args.min_win_rate),
        ):
            if value is not None:
                raise EvalError(f"{flag} needs --judge URL")
    else:
        key_env = args.judge_api_key_env
        judge = Target(
            "judge", api_base(args.judge), args.judge_model, api_key(key_env, "the judge") if key_env else None, key_env
        )
    all_items = load_eval_set(args.eval_set)
    items = choose_subset(all_items, args.limit)
    out = args.out or Path("eval-reports") / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return EvalPlan(
        targets=tuple(targets),
        items=tuple(items),
        items_total=len(all_items),
        eval_set=args.eval_set,
        topics=tuple(topics_in_order(items)),
        limit=args.limit,
        max_tokens=args.max_tokens,
        concurrency=args.concurrency,
        out=out,
        judge=judge,
        judge_max_tokens=args.judge_max_tokens,
        thresholds={spec.flag: getattr(args, spec.flag.removeprefix("--").replace("-", "_")) for spec in GATES},
    )


# --- the run ------------------------------------------------------------------------------------


class _Bar:
    """A tqdm progress bar on stderr."""

    def __init__(self, total: int, description: str, unit: str):
        from tqdm import tqdm

        self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def advance(self, *_: object) -> None:
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


async def answer_target(plan: EvalPlan, target: Target) -> TargetRun:
    """Ask `target` every item, reading its gateway's /stats before and after."""
    before = await fetch_stats(target.root, target.api_key)
    started_at = time.time()
    bar = _Bar(len(plan.items), f"answering {target.label}", "answer")
    try:
        async with TeacherClient(target.client_config()) as client:
            answers = await answer_items(client, plan.items, plan.max_tokens, plan.concurrency, bar.advance)
            sent = client.usage.requests
    finally:
        bar.close()
    finished_at = time.time()
    after = await fetch_stats(target.root, target.api_key) if before.document is not None else before
    if before.document is not None and after.document is not None:
        energy = gateway_energy(before.document, after.document, sent)
    else:
        energy = not_measured(after.reason or before.reason or "no /stats")
    scored = [score_answer(item, answer) for item, answer in zip(plan.items, answers, strict=True)]
    prompt = sum(answer.prompt_tokens or 0 for answer in answers)
    completion = sum(answer.completion_tokens or 0 for answer in answers)
    cost = (
        None
        if target.price is None
        else token_cost(target.price_name or "--price", target.price, prompt, completion, len(answers))
    )
    return TargetRun(target, scored, energy, cost, started_at, finished_at, sent)


async def judge_runs(plan: EvalPlan, judge_target: Target, runs: Sequence[TargetRun]) -> None:
    """Ask the judge about every answer of every run (both orders) and attach the verdicts."""
    slots = asyncio.Semaphore(plan.concurrency)
    bar = _Bar(len(runs) * len(plan.items), "judging", "item")
    try:
        async with AsyncExitStack() as stack:
            structured = await stack.enter_async_context(
                TeacherClient(judge_target.client_config(extra_body={"response_format": VERDICT_SCHEMA}))
            )
            plain = await stack.enter_async_context(TeacherClient(judge_target.client_config()))
            judge = Judge(structured, plain, plan.judge_max_tokens)

            async def one(entry: ScoredAnswer) -> ScoredAnswer:
                async with slots:
                    judgement = await judge.judge(entry.item.question, entry.answer.text, entry.item.reference)
                bar.advance()
                return replace(entry, judgement=judgement)

            for run in runs:
                run.scored = list(await asyncio.gather(*(one(entry) for entry in run.scored)))
                run.judge = JudgeTally.of(entry.judgement.outcome for entry in run.scored if entry.judgement)
    finally:
        bar.close()


async def evaluate(plan: EvalPlan) -> tuple[list[TargetRun], EvalPlan]:
    """Resolve every model (fails early on an unreachable server), answer, then judge."""
    targets = [await resolve_model(target) for target in plan.targets]
    judge = None if plan.judge is None else await resolve_model(plan.judge)
    plan = replace(plan, targets=tuple(targets), judge=judge)
    runs = [await answer_target(plan, target) for target in targets]
    if judge is not None:
        try:
            await judge_runs(plan, judge, runs)
        except TeacherRejectedError as error:
            raise EvalError(f"the judge: {client_error_text(error)}") from None
    return runs, plan


def report_document(plan: EvalPlan, runs: Sequence[TargetRun], created_at: str) -> tuple[dict[str, Any], list[Gate]]:
    """report.json's content, and the gates checked on the first target."""
    summaries = [run.summary(plan.topics) for run in runs]
    gates = check_gates(plan.thresholds, summaries[0])
    document = {
        "format": REPORT_FORMAT,
        "created_at": created_at,
        "eval_set": {
            "path": str(plan.eval_set),
            "items_total": plan.items_total,
            "items_used": len(plan.items),
            "limit": plan.limit,
            "topics": list(plan.topics),
            "item_ids": [item.id for item in plan.items],
        },
        "settings": {"max_tokens": plan.max_tokens, "temperature": 0.0, "concurrency": plan.concurrency},
        "judge": None
        if plan.judge is None
        else {"url": plan.judge.url, "model": plan.judge.model, "max_tokens": plan.judge_max_tokens},
        "targets": summaries,
        "gates": [gate.as_json() for gate in gates],
        "passed": all(gate.passed for gate in gates),
        "definitions": DEFINITIONS,
    }
    return document, gates


def run(args: argparse.Namespace) -> int:
    """`student eval`: 0 when the gates hold, 1 when one fails, 2 when it could not run."""
    try:
        plan = plan_from_args(args)
        check_out(plan.out)
        created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        runs, plan = asyncio.run(evaluate(plan))
        document, gates = report_document(plan, runs, created_at)
        rows = [entry.row(run.target) for run in runs for entry in run.scored]
        publish_report(plan.out, document, rows, plan.topics)
    except EvalError as error:
        print(f"student eval: error: {error}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print("student eval: interrupted; no report written", file=sys.stderr)
        return 130
    print(f"student eval: report in {plan.out / REPORT_MD}")
    for gate in gates:
        print(f"student eval: gate {gate.describe()}", file=sys.stdout if gate.passed else sys.stderr)
    return EXIT_PASSED if all(gate.passed for gate in gates) else EXIT_GATE_FAILED
