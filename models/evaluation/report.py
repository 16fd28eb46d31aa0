"""The report folder: report.md (targets as columns), report.json, answers.jsonl and a plot.

Everything is written into a hidden staging folder next to `--out` and renamed into place at the
end, so a run that stops early leaves no half-written report behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from models.evaluation.errors import EvalError

REPORT_FORMAT = "student-eval-report/1"
REPORT_MD, REPORT_JSON, ANSWERS_JSONL, PLOT_PNG = (
    "report.md",
    "report.json",
    "answers.jsonl",
    "fact_recall_by_topic.png",
)

DEFINITIONS = {
    "fact_recall": "facts stated / facts required, over all items; a fact is stated when any of its alternatives "
    "occurs in the answer (case-insensitive, after Unicode NFC and whitespace collapsing)",
    "exact_answer_rate": "the share of items whose every required fact is stated",
    "chrf": "sacrebleu chrF (0-100) against the reference answers: corpus-level here, per answer in answers.jsonl",
    "empty_share": "answers with no letter or digit (a failed request counts as empty)",
    "refusal_share": 'answers containing a refusal pattern ("xin lỗi, tôi không thể", "I cannot", "As an AI", ...)',
    "not_vietnamese_share": "non-empty answers py3langid does not classify as Vietnamese, out of all answers",
    "vietnamese_share": "non-empty answers classified as Vietnamese, out of all answers (--min-vietnamese)",
    "latency_ms": "whole-answer time seen by this client, ms, first-attempt answers only (not streamed)",
    "tokens": "prompt and completion tokens from each response's usage",
    "energy": "a student-serve gateway's own accounting: /stats all-time counters before and after the target's "
    "requests; energy attributed to requests (idle not included) and its electricity in the gateway's tariff",
    "token_cost": "tokens × the price given with --price (USD per 1M input and output tokens)",
    "judge": "blind A/B comparison with the reference answer, asked in both orders: win = target preferred in both, "
    "loss = reference preferred in both, tie otherwise; invalid = an unreadable verdict (left out of judged)",
    "win_rate": "(wins + ties/2) / judged; 0.5 = as good as the reference (--min-win-rate)",
    "quality_vs_reference_pct": "win rate ÷ 0.5 − 1, in percent: 0 % = as good as the reference",
}


def check_out(out: Path) -> None:
    """`out` can receive a report: absent, or an empty folder (checked before any request)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EvalError(f"--out {out} already exists and is not an empty folder: choose another")


def publish_report(
    out: Path, document: Mapping[str, Any], rows: Iterable[Mapping[str, Any]], topics: Sequence[str]
) -> None:
    """Write the report into `.OUT.partial` beside `out`, then rename it to `out` (an empty `out`
    is replaced); the staging folder is removed if anything fails."""
    check_out(out)
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write_report(staging, document, rows, topics)
        if out.is_dir():
            out.rmdir()
        staging.rename(out)
    except OSError as error:
        raise EvalError(f"cannot write the report to {out}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_report(
    folder: Path, document: Mapping[str, Any], rows: Iterable[Mapping[str, Any]], topics: Sequence[str]
) -> None:
    """The four files into `folder`."""
    (folder / REPORT_JSON).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with (folder / ANSWERS_JSONL).open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    plot_recall_by_topic(document["targets"], topics, folder / PLOT_PNG)
    (folder / REPORT_MD).write_text(render_markdown(document), encoding="utf-8")


def plot_recall_by_topic(targets: Sequence[Mapping[str, Any]], topics: Sequence[str], path: Path) -> None:
    """Grouped bars: fact recall (%) per topic, one bar per target."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    width = 0.8 / max(len(targets), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(topics) + 2), 4.5))
    for index, target in enumerate(targets):
        recalls = [(target["by_topic"][topic]["fact_recall"] or 0.0) * 100 for topic in topics]
        positions = [position + (index - (len(targets) - 1) / 2) * width for position in range(len(topics))]
        axes.bar(positions, recalls, width, label=target["label"])
    axes.set_xticks(range(len(topics)), topics, rotation=40, ha="right")
    axes.set_ylim(0, 100)
    axes.set_ylabel("fact recall (%)")
    axes.set_title("Fact recall per topic")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --- report.md --------------------------------------------------------------------------------


def _pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f} %"


def _num(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _latency(target: Mapping[str, Any]) -> str:
    latency = target["latency_ms"]
    return f"{_num(latency['p50'], '.0f')} / {_num(latency['p95'], '.0f')} ms"


def _tokens(target: Mapping[str, Any]) -> str:
    tokens = target["tokens"]
    return f"{_num(tokens['prompt_per_answer'])} / {_num(tokens['completion_per_answer'])}"


def _token_cost(target: Mapping[str, Any]) -> str:
    cost = target["cost"]["tokens"]
    if cost is None:
        return "no price given"
    return f"${_num(cost['usd_per_1000_answers'], '.4g')} ({cost['price']})"


def _judge_counts(target: Mapping[str, Any]) -> str:
    judge = target["judge"]
    return "–" if judge is None else f"{judge['wins']} / {judge['ties']} / {judge['losses']} / {judge['invalid']}"


def _quality(target: Mapping[str, Any]) -> str:
    judge = target["judge"]
    if judge is None or judge["quality_vs_reference_pct"] is None:
        return "–"
    return f"{judge['quality_vs_reference_pct']:+.1f} % (win rate {judge['win_rate']:.3f}, {judge['judged']} judged)"


ROWS: tuple[tuple[str, Callable[[Mapping[str, Any]], str]], ...] = (
    ("model", lambda t: f"`{t['model']}`"),
    ("answers (failed)", lambda t: f"{t['answers']} ({t['errors']})"),
    ("fact recall", lambda t: f"{_pct(t['fact_recall'])} ({t['facts_stated']}/{t['facts_required']} facts)"),
    ("exact-answer rate", lambda t: f"{_pct(t['exact_answer_rate'])} ({t['exact_answers']}/{t['answers']} items)"),
    ("chrF (corpus)", lambda t: _num(t["chrf"])),
    ("empty answers", lambda t: _pct(t["empty_share"])),
    ("refusals", lambda t: _pct(t["refusal_share"])),
    ("not Vietnamese", lambda t: _pct(t["not_vietnamese_share"])),
    ("latency p50 / p95", _latency),
    ("tokens per answer (prompt / completion)", _tokens),
    ("energy cost per 1,000 answers", lambda t: t["cost"]["energy_summary"]),
    ("API price per 1,000 answers", _token_cost),
    ("judge: win / tie / loss / invalid", _judge_counts),
    ("quality vs reference", _quality),
)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(cell) for cell in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def render_markdown(document: Mapping[str, Any]) -> str:
    targets = document["targets"]
    eval_set = document["eval_set"]
    judge = document["judge"]
    out = [
        "# Student eval",
        "",
        f"{document['created_at']}: {eval_set['items_used']} of {eval_set['items_total']} items of "
        f"`{eval_set['path']}` ({len(eval_set['topics'])} topics), temperature 0, max_tokens "
        f"{document['settings']['max_tokens']}." + (f" Judge: `{judge['model']}` at {judge['url']}." if judge else ""),
        "",
    ]
    if not judge:
        rows = [row for row in ROWS if not row[0].startswith(("judge", "quality"))]
    else:
        rows = list(ROWS)
    out += _table(
        ["", *(target["label"] for target in targets)], ([name, *(f(t) for t in targets)] for name, f in rows)
    )
    out += ["", "## Gates (first target: " + targets[0]["label"] + ")", ""]
    gates = document["gates"]
    if not gates:
        out.append("No gate was set (`--min-fact-recall`, `--min-vietnamese`, `--max-empty`, `--min-win-rate`).")
    for gate in gates:
        state = "passed" if gate["passed"] else "**FAILED**"
        sign = ">=" if gate["at_least"] else "<="
        out.append(
            f"- {gate['figure']} {sign} {gate['threshold']:g} (`{gate['flag']}`): {_num(gate['value'], '.4g')}, {state}"
        )
    out += ["", "## Fact recall per topic", ""]
    topics = eval_set["topics"]
    out += _table(
        ["topic", "items", *(target["label"] for target in targets)],
        (
            [
                topic,
                str(targets[0]["by_topic"][topic]["items"]),
                *(_pct(t["by_topic"][topic]["fact_recall"]) for t in targets),
            ]
            for topic in topics
        ),
    )
    out += ["", f"![fact recall per topic]({PLOT_PNG})", "", "## Notes", ""]
    out += _notes(targets)
    out += ["", "## Definitions", ""]
    out += [f"- **{name}**: {text}" for name, text in document["definitions"].items()]
    out += ["", f"Every answer with its scores: `{ANSWERS_JSONL}`; every figure: `{REPORT_JSON}`.", ""]
    return "\n".join(out)


def _notes(targets: Sequence[Mapping[str, Any]]) -> list[str]:
    notes = []
    for target in targets:
        energy = target["cost"]["energy"]
        if energy["measured"] and energy["other_requests"]:
            notes.append(
                f"- {target['label']}: the gateway finished {energy['other_requests']} requests from other clients "
                "during the run; their energy is in the figure, which averages over all its requests."
            )
        if target["errors"]:
            notes.append(f"- {target['label']}: {target['errors']} requests failed (scored as empty answers).")
        if target["retried"]:
            notes.append(f"- {target['label']}: {target['retried']} answers needed a retry (left out of latency).")
        if energy["measured"] and energy["total_j"] is not None:
            notes.append(
                f"- {target['label']}: the meter measured {energy['total_j']:.4g} J over its requests, idle included "
                f"({energy['attributed_j']:.4g} J attributed to requests)."
            )
    return notes or ["- Nothing unusual."]
