"""`student eval` end to end, as a subprocess, against the session stack on the tiny random model:
the gateway and vLLM direct as two targets, the same gateway as the judge.

One eval run (module fixture) serves the report checks; one more run checks a failing gate and
invalid verdicts. A random model states no facts and its verdicts mean nothing: the tests check
that every figure is what answers.jsonl says, not what the figures are. Runs that cannot start
(unreachable target, an item without facts) need no stack.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from models.evaluation.eval_set import DEFAULT_EVAL_SET, choose_subset, load_eval_set
from models.evaluation.judging import combine
from models.evaluation.scoring import corpus_chrf
from server.telemetry.stats import percentiles
from tests.support import STUDENT, Stack, free_port, gateway_stats

ITEMS = 8
TARGETS = ("gateway", "vllm")
PRICE_IN, PRICE_OUT = 0.5, 2.0  # USD per 1M tokens, for the vllm target
TIMEOUT_S = 600


@dataclass
class EvalRun:
    out: Path
    returncode: int
    stdout: str
    stderr: str
    gateway_requests: int  # what the gateway's /stats counted during the run

    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text(encoding="utf-8"))

    def rows(self) -> list[dict]:
        lines = (self.out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def target(self, label: str) -> dict:
        return next(target for target in self.report()["targets"] if target["label"] == label)


def student_eval(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([STUDENT, "eval", *args], check=False, capture_output=True, text=True, timeout=TIMEOUT_S)


def run_eval(stack: Stack, out: Path, *args: str) -> EvalRun:
    before = gateway_stats(stack.url)["requests"]["total"]
    done = student_eval("--out", str(out), *args)
    after = gateway_stats(stack.url)["requests"]["total"]
    return EvalRun(out, done.returncode, done.stdout, done.stderr, after - before)


@pytest.fixture(scope="module")
def eval_run(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> EvalRun:
    out = tmp_path_factory.mktemp("eval") / "report"
    return run_eval(
        stack, out,
        "--target", f"gateway={stack.url}", "--target", f"vllm={stack.vllm_url}/v1",
        "--price", f"vllm={PRICE_IN},{PRICE_OUT}", "--limit", str(ITEMS), "--max-tokens", "16",
        "--judge", stack.url, "--judge-model", "student",
    )  # fmt: skip


def test_the_report_folder_holds_every_answer_and_figure(eval_run: EvalRun) -> None:
    assert eval_run.returncode == 0, eval_run.stderr
    assert f"report in {eval_run.out / 'report.md'}" in eval_run.stdout
    assert {path.name for path in eval_run.out.iterdir()} == {
        "report.md", "report.json", "answers.jsonl", "fact_recall_by_topic.png",
    }  # fmt: skip
    assert (eval_run.out / "fact_recall_by_topic.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not list(eval_run.out.parent.glob(".*partial*"))
    assert "answering gateway" in eval_run.stderr and "judging" in eval_run.stderr  # the progress bars

    expected = choose_subset(load_eval_set(DEFAULT_EVAL_SET), ITEMS)
    report, rows = eval_run.report(), eval_run.rows()
    assert report["eval_set"]["item_ids"] == [item.id for item in expected]
    assert len(rows) == ITEMS * len(TARGETS)
    assert [(row["target"], row["id"]) for row in rows] == [(t, item.id) for t in TARGETS for item in expected]
    assert [target["label"] for target in report["targets"]] == list(TARGETS)
    assert report["passed"] is True and report["gates"] == []

    markdown = (eval_run.out / "report.md").read_text(encoding="utf-8")
    assert "|  | gateway | vllm |" in markdown
    for row_name in ("fact recall", "exact-answer rate", "chrF", "latency p50 / p95", "quality vs reference"):
        assert f"| {row_name}" in markdown


@pytest.mark.parametrize("label", TARGETS)
def test_every_figure_is_what_the_answers_say(eval_run: EvalRun, label: str) -> None:
    rows = [row for row in eval_run.rows() if row["target"] == label]
    target = eval_run.target(label)
    references = {item.id: item.reference for item in load_eval_set(DEFAULT_EVAL_SET)}
    stated = sum(len(row["facts_stated"]) for row in rows)
    required = stated + sum(len(row["facts_missing"]) for row in rows)
    assert required >= ITEMS and (target["facts_stated"], target["facts_required"]) == (stated, required)
    assert target["fact_recall"] == pytest.approx(stated / required)
    assert target["exact_answer_rate"] == pytest.approx(sum(not row["facts_missing"] for row in rows) / ITEMS)
    assert all(row["exact"] == (not row["facts_missing"]) for row in rows)
    assert target["chrf"] == pytest.approx(
        corpus_chrf([r["answer"] for r in rows], [references[r["id"]] for r in rows])
    )
    assert all(0.0 <= row["chrf"] <= 100.0 for row in rows)
    assert target["empty_share"] == pytest.approx(sum(row["empty"] for row in rows) / ITEMS)
    assert target["refusal_share"] == pytest.approx(sum(row["refusal"] for row in rows) / ITEMS)
    not_vietnamese = sum(not row["empty"] and row["language"] != "vi" for row in rows)
    assert target["not_vietnamese_share"] == pytest.approx(not_vietnamese / ITEMS)
    assert all((row["language"] is None) == row["empty"] for row in rows)
    assert target["errors"] == 0 and all(row["error"] is None and row["attempts"] == 1 for row in rows)
    latency = percentiles(row["latency_ms"] for row in rows)
    assert target["latency_ms"]["count"] == ITEMS and target["latency_ms"]["p95"] == pytest.approx(latency["p95"])
    assert all(row["completion_tokens"] <= 16 and row["prompt_tokens"] > 0 for row in rows)
    assert target["tokens"]["prompt"] == sum(row["prompt_tokens"] for row in rows)
    assert target["tokens"]["completion"] == sum(row["completion_tokens"] for row in rows)
    by_topic = target["by_topic"]
    assert sum(topic["items"] for topic in by_topic.values()) == ITEMS
    assert sum(topic["facts_stated"] for topic in by_topic.values()) == stated


def test_cost_is_measured_energy_behind_the_gateway_and_tokens_times_price_elsewhere(
    eval_run: EvalRun, stack: Stack
) -> None:
    gateway_energy = gateway_stats(stack.url)["energy"]
    energy = eval_run.target("gateway")["cost"]["energy"]
    if gateway_energy["status"] == "ok":  # a box with a GPU or RAPL
        assert energy["measured"] and energy["gateway_requests"] == ITEMS
    else:
        assert not energy["measured"] and energy["reason"] == gateway_energy["reason"]
        assert eval_run.target("gateway")["cost"]["energy_summary"] == f"not measured: {gateway_energy['reason']}"
        assert f"not measured: {gateway_energy['reason']}" in (eval_run.out / "report.md").read_text(encoding="utf-8")
    assert eval_run.target("gateway")["cost"]["tokens"] is None

    vllm = eval_run.target("vllm")["cost"]
    assert vllm["energy_summary"] == "not measured: not a student-serve gateway"
    tokens = eval_run.target("vllm")["tokens"]
    usd = (tokens["prompt"] * PRICE_IN + tokens["completion"] * PRICE_OUT) / 1e6
    assert vllm["tokens"]["usd"] == pytest.approx(usd)
    assert vllm["tokens"]["usd_per_1000_answers"] == pytest.approx(usd / ITEMS * 1000)


def test_the_judge_was_asked_both_orders_and_the_counts_add_up(eval_run: EvalRun) -> None:
    # the gateway saw its own target's answers and two judge requests per item and target
    assert eval_run.gateway_requests == ITEMS + 2 * ITEMS * len(TARGETS)
    for label in TARGETS:
        rows = [row for row in eval_run.rows() if row["target"] == label]
        outcomes = []
        for row in rows:
            first, second = row["judge"]["orders"]
            assert (first["order"], second["order"]) == ("target_first", "reference_first")
            assert row["judge"]["outcome"] == combine(first["prefers"], second["prefers"])
            outcomes.append(row["judge"]["outcome"])
        judge = eval_run.target(label)["judge"]
        counted = {name: outcomes.count(name) for name in ("win", "tie", "loss", "invalid")}
        assert (judge["wins"], judge["ties"], judge["losses"], judge["invalid"]) == tuple(counted.values())
        assert judge["wins"] + judge["ties"] + judge["losses"] + judge["invalid"] == ITEMS
        assert judge["judged"] == ITEMS - judge["invalid"]
        if judge["judged"]:
            win_rate = (judge["wins"] + judge["ties"] / 2) / judge["judged"]
            assert judge["quality_vs_reference_pct"] == pytest.approx((win_rate / 0.5 - 1) * 100)


def test_a_failing_gate_exits_1_and_unreadable_verdicts_are_invalid(stack: Stack, tmp_path: Path) -> None:
    # A one-token verdict is cut off ("{"): every verdict is unreadable, so no item is judged.
    run = run_eval(
        stack, tmp_path / "report",
        "--target", f"gateway={stack.url}/v1", "--limit", "2", "--max-tokens", "4",
        "--judge", f"{stack.url}/v1", "--judge-max-tokens", "1",
        "--min-fact-recall", "1.01", "--max-empty", "1", "--min-win-rate", "0",
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "gate --min-fact-recall: fact recall " in run.stderr and " < 1.01: FAILED" in run.stderr
    assert "gate --min-win-rate: judge win rate unknown" in run.stderr
    assert "gate --max-empty" in run.stdout and "passed" in run.stdout
    report = run.report()
    assert report["passed"] is False
    assert [(gate["flag"], gate["passed"]) for gate in report["gates"]] == [
        ("--min-fact-recall", False), ("--max-empty", True), ("--min-win-rate", False),
    ]  # fmt: skip
    judge = report["targets"][0]["judge"]
    assert (judge["invalid"], judge["judged"], judge["quality_vs_reference_pct"]) == (2, 0, None)
    assert all(order["verdict"] is None for row in run.rows() for order in row["judge"]["orders"])
    assert "**FAILED**" in (run.out / "report.md").read_text(encoding="utf-8")


def test_an_unreachable_target_exits_2_with_one_line_and_no_report(tmp_path: Path) -> None:
    done = student_eval("--target", f"down=http://127.0.0.1:{free_port()}", "--out", str(tmp_path / "report"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("student eval: error: cannot reach target down")
    assert list(tmp_path.iterdir()) == []


def test_an_item_without_facts_exits_2_with_one_line_and_no_report(tmp_path: Path) -> None:
    lines = DEFAULT_EVAL_SET.read_text(encoding="utf-8").splitlines()[:3]
    broken = json.loads(lines[1]) | {"facts": []}
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(
        "\n".join([lines[0], json.dumps(broken, ensure_ascii=False), lines[2]]) + "\n", encoding="utf-8"
    )
    done = student_eval("--target", "x=http://127.0.0.1:1", "--eval-set", str(eval_set), "--out", str(tmp_path / "r"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"line 2 (item {broken['id']}): no facts" in done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval.jsonl"]


def test_bad_flags_exit_2_before_any_request(tmp_path: Path) -> None:
    for args, message in [
        (["--target", "a=http://127.0.0.1:1", "--min-win-rate", "0.5"], "--min-win-rate needs --judge URL"),
        (["--target", "a=http://127.0.0.1:1", "--price", "b=1,2"], "no --target is labelled 'b'"),
        (["--target", "a=http://127.0.0.1:1", "--price", "a=cheap"], "USD per 1M tokens"),
        (["--target", "http://127.0.0.1:1"], "expected LABEL=URL"),
        (["--target", "a=http://127.0.0.1:1", "--api-key-env", "a=STUDENT_EVAL_TEST_UNSET"], "is not set"),
    ]:
        done = student_eval(*args, "--out", str(tmp_path / "r"))
        assert done.returncode == 2 and message in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert list(tmp_path.iterdir()) == []
