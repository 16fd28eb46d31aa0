"""`student dataset check`: is a chat JSONL file fit for LoRA training; a stable train/validation split.

The input is the chat "messages" JSONL that `models.chat_data.load_chat_jsonl` reads; rows may carry
extra keys, of which `task` (any name; `student distill` writes `response`, `cot`, `summary`,
`qa`, `classify`, `extract`; rows without one count as task "(none)") and `reasoning` are used.
Lines are numbered from 1, counting blank ones, ending at "\\n" only.

Findings; all but the last fail the check (exit status 1):

- malformed line: not UTF-8, not JSON, not a chat `load_chat_jsonl` accepts, no assistant turn,
  or a `task`/`reasoning` that is not a string;
- task below the minimum: fewer than `--min-per-task` samples (the article asks 1,000 per task);
  only a warning with `--allow-small`;
- exact duplicate: the same messages (roles and contents, Unicode NFC, whitespace runs as one
  space) as an earlier line;
- near-empty answer: an assistant turn with fewer than `--min-answer-chars` letters or digits
  once `<think>…</think>` is removed (3 by default: short classification labels still pass);
- `cot` without reasoning: task `cot` with no non-empty `<think>…</think>` in an assistant turn
  and no non-empty `reasoning` field (`student train-lora` puts that field into the answer);
- near-duplicate question (a warning): samples that differ but whose user text is equal after
  NFC, casefolding, turning Unicode punctuation (categories P*) into spaces and collapsing
  whitespace. Nothing fuzzier: it finds the teacher repeating itself, not paraphrases.

Split (`--split-out DIR`): every well-formed sample goes to `DIR/validation.jsonl` when

    int(sha256(f"{seed}\\0{key}")[:16 hex digits]) / 2**64 < validation_fraction

and to `DIR/train.jsonl` otherwise, where `key` is the sample's near-duplicate question key (its
normalised user text; the normalised messages when it has no user turn). A sample's side depends
on nothing but itself and the seed, so adding samples never moves existing ones; and all
samples asking the same question land on the same side, so no question leaks from training into
validation. Rows are written unchanged (extra keys kept) in file order; malformed lines and the
later copies of exact duplicates are left out, and with `--drop-flagged` the samples with a
near-empty answer and the `cot` samples without reasoning too (the check still fails on them: it
judges the file; the split is what is fit to train on). One exception keeps tiny sets usable: when the
hash puts no question in validation (or none in train) and there are at least two distinct
questions, the one with the smallest (largest) hash is moved there. Both files are rewritten on
every run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from models.chat_data import ChatSample, DatasetError, parse_chat_sample

REPORT_FORMAT = "student-dataset-check/1"
DEFAULT_MIN_PER_TASK = 1000
DEFAULT_MIN_ANSWER_CHARS = 3
DEFAULT_VALIDATION_FRACTION = 0.1
NO_TASK = "(none)"
COT_TASK = "cot"
TRAIN_FILE = "train.jsonl"
VALIDATION_FILE = "validation.jsonl"
SHOWN_PER_SECTION = 10
THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


@dataclass(frozen=True)
class Malformed:
    line: int
    reason: str


@dataclass(frozen=True)
class TaskCount:
    task: str
    samples: int
    minimum: int

    @property
    def below_minimum(self) -> bool:
        return self.samples < self.minimum


@dataclass(frozen=True)
class LineGroup:
    """Lines that hold the same sample (exact) or ask the same question (near); `text` shows which."""

    lines: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class Flagged:
    line: int
    task: str
    detail: str


@dataclass(frozen=True)
class Split:
    directory: str
    train: int
    validation: int
    left_out_duplicates: int
    validation_fraction: float
    seed: int
    left_out_flagged: int = 0  # near-empty answers and cot without reasoning, with --drop-flagged


@dataclass(frozen=True)
class CheckReport:
    """Everything `student dataset check` found; `problems` fail the check, `warnings` do not."""

    file: str
    lines: int
    samples: int
    min_per_task: int
    min_answer_chars: int
    allow_small: bool
    tasks: tuple[TaskCount, ...]
    malformed: tuple[Malformed, ...]
    exact_duplicates: tuple[LineGroup, ...]
    near_duplicate_questions: tuple[LineGroup, ...]
    near_empty: tuple[Flagged, ...]
    cot_missing_reasoning: tuple[Flagged, ...]
    problems: tuple[str, ...]
    warnings: tuple[str, ...]
    split: Split | None = None

    @property
    def passed(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, object]:
        data = asdict(self)
        data["tasks"] = {
            count.task: {
                "samples": count.samples,
                "minimum": count.minimum,
                "below_minimum": count.below_minimum,
            }
            for count in self.tasks
        }
        return {"format": REPORT_FORMAT, "passed": self.passed, **data}


@dataclass(frozen=True)
class Row:
    """A well-formed line: its number, the decoded object and the parsed chat."""

    line: int
    data: dict[str, object]
    sample: ChatSample
    task: str


class CheckError(Exception):
    """The check cannot run as asked (missing file, bad option); the message says why."""


def normalise(text: str) -> str:
    """Unicode NFC with whitespace runs as one space, stripped: the exact-duplicate form."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def question_key(text: str) -> str:
    """The near-duplicate form: NFC, casefolded, Unicode punctuation as spaces, whitespace collapsed."""
    folded = unicodedata.normalize("NFC", unicodedata.normalize("NFC", text).casefold())
    spaced = "".join(" " if unicodedata.category(char).startswith("P") else char for char in folded)
    return " ".join(spaced.split())


def exact_key(sample: ChatSample) -> str:
    pairs = [[message.role, normalise(message.content)] for message in sample.messages]
    return json.dumps(pairs, ensure_ascii=False)


def sample_question_key(sample: ChatSample) -> str:
    """The near-duplicate key of the sample's user turns (empty when it has none)."""
    return question_key("\n".join(message.content for message in sample.messages if message.role == "user"))


def answer_text(content: str) -> str:
    """An assistant turn without its `<think>…</think>` reasoning."""
    return THINK.sub("", content)


def has_reasoning(row: Row) -> bool:
    reasoning = row.data.get("reasoning")
    if isinstance(reasoning, str) and reasoning.strip():
        return True
    return any(
        match.strip()
        for message in row.sample.messages
        if message.role == "assistant"
        for match in THINK.findall(message.content)
    )


def _parse_line(number: int, raw: bytes, where: str) -> Row | Malformed:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Malformed(number, f"not valid UTF-8 (byte {error.start})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        return Malformed(number, f"not valid JSON ({error.msg} at column {error.colno})")
    try:
        sample = parse_chat_sample(data, where)
    except DatasetError as error:
        return Malformed(number, str(error).removeprefix(f"{where}: "))
    task, reasoning = data.get("task"), data.get("reasoning")
    task = NO_TASK if task is None else task
    if not isinstance(task, str) or not task.strip():
        return Malformed(number, f'"task" is {task!r}; expected a non-empty string')
    if reasoning is not None and not isinstance(reasoning, str):
        return Malformed(number, '"reasoning" is not a string')
    if not any(message.role == "assistant" for message in sample.messages):
        return Malformed(number, "no assistant message: nothing to train on")
    return Row(number, data, sample, task)


def read_rows(path: Path) -> tuple[int, list[Row], list[Malformed]]:
    """Count of non-blank lines, the well-formed rows and the malformed lines of `path`."""
    if not path.exists():
        raise CheckError(f"dataset file {path} does not exist")
    if not path.is_file():
        raise CheckError(f"dataset path {path} is not a file")
    rows: list[Row] = []
    malformed: list[Malformed] = []
    lines = 0
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        lines += 1
        parsed = _parse_line(number, raw, f"line {number}")
        if isinstance(parsed, Row):
            rows.append(parsed)
        else:
            malformed.append(parsed)
    return lines, rows, malformed


def exact_duplicates(rows: Sequence[Row]) -> list[LineGroup]:
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        groups[exact_key(row.sample)].append(row)
    return [
        LineGroup(tuple(row.line for row in group), _preview(group[0].sample))
        for group in groups.values()
        if len(group) > 1
    ]


def near_duplicate_questions(rows: Sequence[Row]) -> list[LineGroup]:
    """Groups asking the same question in samples that are not all one exact duplicate."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        key = sample_question_key(row.sample)
        if key:
            groups[key].append(row)
    return [
        LineGroup(tuple(row.line for row in group), key)
        for key, group in groups.items()
        if len({exact_key(row.sample) for row in group}) > 1
    ]


def near_empty(rows: Sequence[Row], min_answer_chars: int) -> list[Flagged]:
    flagged = []
    for row in rows:
        for message in row.sample.messages:
            if message.role != "assistant":
                continue
            chars = sum(char.isalnum() for char in answer_text(message.content))
            if chars < min_answer_chars:
                detail = f"answer has {chars} letters or digits: {message.content!r:.60}"
                flagged.append(Flagged(row.line, row.task, detail))
                break
    return flagged


def cot_missing_reasoning(rows: Sequence[Row]) -> list[Flagged]:
    return [
        Flagged(row.line, row.task, 'no <think>…</think> in the answer and no "reasoning" field')
        for row in rows
        if row.task == COT_TASK and not has_reasoning(row)
    ]


def _preview(sample: ChatSample) -> str:
    user = [message.content for message in sample.messages if message.role == "user"]
    return normalise(user[-1] if user else sample.messages[-1].content)


def task_counts(rows: Sequence[Row], min_per_task: int) -> list[TaskCount]:
    counts = Counter(row.task for row in rows)
    return [TaskCount(task, counts[task], min_per_task) for task in sorted(counts)]


def split_bucket(key: str, seed: int) -> float:
    """The sample's place in [0, 1): the first 64 bits of sha256(seed, key)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_rows(
    rows: Sequence[Row], validation_fraction: float, seed: int, leave_out: frozenset[int] = frozenset()
) -> tuple[list[Row], list[Row], int]:
    """(train, validation, left-out duplicates) of the rows whose lines are not in `leave_out`:
    see the module docstring for the rule."""
    seen: set[str] = set()
    kept: list[Row] = []
    rows = [row for row in rows if row.line not in leave_out]
    for row in rows:
        key = exact_key(row.sample)
        if key not in seen:
            seen.add(key)
            kept.append(row)
    keys = [sample_question_key(row.sample) or exact_key(row.sample) for row in kept]
    buckets = {key: split_bucket(key, seed) for key in keys}
    validation_keys = {key for key, bucket in buckets.items() if bucket < validation_fraction}
    if len(buckets) >= 2 and not validation_keys:
        validation_keys = {min(buckets, key=buckets.__getitem__)}
    if len(buckets) >= 2 and validation_keys == set(buckets):
        validation_keys.discard(max(buckets, key=buckets.__getitem__))
    train = [row for row, key in zip(kept, keys, strict=True) if key not in validation_keys]
    validation = [row for row, key in zip(kept, keys, strict=True) if key in validation_keys]
    return train, validation, len(rows) - len(kept)


def write_jsonl(rows: Sequence[Row], path: Path) -> None:
    """Write the rows' original objects, one per line, through a temporary file renamed into place."""
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row.data, ensure_ascii=False) + "\n")
    staging.replace(path)


def write_split(
    rows: Sequence[Row], directory: Path, validation_fraction: float, seed: int, leave_out: frozenset[int] = frozenset()
) -> Split:
    if directory.exists() and not directory.is_dir():
        raise CheckError(f"--split-out {directory} exists and is not a directory")
    train, validation, duplicates = split_rows(rows, validation_fraction, seed, leave_out)
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(train, directory / TRAIN_FILE)
    write_jsonl(validation, directory / VALIDATION_FILE)
    flagged = sum(row.line in leave_out for row in rows)
    return Split(str(directory), len(train), len(validation), duplicates, validation_fraction, seed, flagged)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def check_dataset(
    path: Path,
    min_per_task: int = DEFAULT_MIN_PER_TASK,
    allow_small: bool = False,
    min_answer_chars: int = DEFAULT_MIN_ANSWER_CHARS,
    split_out: Path | None = None,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
    seed: int = 0,
    drop_flagged: bool = False,
) -> CheckReport:
    """Check `path` and, with `split_out`, write the train/validation split there (without the
    near-empty and cot-without-reasoning samples when `drop_flagged`)."""
    if min_per_task < 0 or min_answer_chars < 0:
        raise CheckError("--min-per-task and --min-answer-chars must not be negative")
    if drop_flagged and split_out is None:
        raise CheckError("--drop-flagged leaves samples out of the split: it needs --split-out DIR")
    if not 0.0 < validation_fraction < 1.0:
        raise CheckError(f"--validation-fraction must be between 0 and 1, not {validation_fraction}")
    lines, rows, malformed = read_rows(Path(path))
    tasks = task_counts(rows, min_per_task)
    duplicates = exact_duplicates(rows)
    near = near_duplicate_questions(rows)
    empty = near_empty(rows, min_answer_chars)
    no_reasoning = cot_missing_reasoning(rows)

    problems: list[str] = []
    warnings: list[str] = []
    if not rows:
        problems.append("no usable samples")
    if malformed:
        problems.append(f"{_plural(len(malformed), 'malformed line')}")
    small = [count for count in tasks if count.below_minimum]
    if small:
        listed = ", ".join(f"{count.task} has {count.samples}" for count in small)
        message = f"{_plural(len(small), 'task')} below the minimum of {min_per_task} samples ({listed})"
        (warnings if allow_small else problems).append(message)
    if duplicates:
        extra = sum(len(group.lines) - 1 for group in duplicates)
        problems.append(f"{_plural(extra, 'exact duplicate')} of earlier samples")
    if empty:
        fewer = f"fewer than {min_answer_chars} letters or digits"
        problems.append(f"{_plural(len(empty), 'near-empty answer')} ({fewer})")
    if no_reasoning:
        problems.append(f"{_plural(len(no_reasoning), 'cot sample')} without reasoning")
    if near:
        samples = sum(len(group.lines) for group in near)
        asked = f"asked by several different samples ({samples} samples)"
        warnings.append(f"{_plural(len(near), 'question')} {asked}")

    split = None
    if split_out is not None and rows:
        leave_out = frozenset(entry.line for entry in (*empty, *no_reasoning)) if drop_flagged else frozenset()
        split = write_split(rows, Path(split_out), validation_fraction, seed, leave_out)
        if split.validation == 0:
            warnings.append("the validation split is empty: there are too few distinct questions")
    return CheckReport(
        file=str(path),
        lines=lines,
        samples=len(rows),
        min_per_task=min_per_task,
        min_answer_chars=min_answer_chars,
        allow_small=allow_small,
        tasks=tuple(tasks),
        malformed=tuple(malformed),
        exact_duplicates=tuple(duplicates),
        near_duplicate_questions=tuple(near),
        near_empty=tuple(empty),
        cot_missing_reasoning=tuple(no_reasoning),
        problems=tuple(problems),
        warnings=tuple(warnings),
        split=split,
    )


def _section(title: str, entries: Sequence[str]) -> list[str]:
    if not entries:
        return [f"{title}: none"]
    lines = [f"{title}: {len(entries)}"]
    lines += [f"  {entry}" for entry in entries[:SHOWN_PER_SECTION]]
    if len(entries) > SHOWN_PER_SECTION:
        lines.append(f"  ... and {len(entries) - SHOWN_PER_SECTION} more (--json lists all)")
    return lines


def _lines(group: LineGroup) -> str:
    return "lines " + ", ".join(str(line) for line in group.lines) + f": {group.text[:60]!r}"


def _flagged_note(split: Split) -> str:
    return f", {split.left_out_flagged} flagged" if split.left_out_flagged else ""


def format_report(report: CheckReport) -> str:
    """The human-readable report: a per-task table, then each finding with its line numbers."""
    out = [f"dataset check: {report.file} ({report.lines} lines, {report.samples} usable samples)", ""]
    width = max([len("task"), *(len(count.task) for count in report.tasks)])
    out.append(f"{'task':<{width}}  {'samples':>7}  {'minimum':>7}  status")
    for count in report.tasks:
        if not count.below_minimum:
            status = "ok"
        else:
            status = f"{'below' if report.allow_small else 'BELOW'}: {count.minimum - count.samples} short"
        out.append(f"{count.task:<{width}}  {count.samples:>7}  {count.minimum:>7}  {status}")
    out.append(f"{'total':<{width}}  {report.samples:>7}")
    out.append("")
    out += _section("malformed lines", [f"line {entry.line}: {entry.reason}" for entry in report.malformed])
    out += _section("exact duplicates (groups)", [_lines(group) for group in report.exact_duplicates])
    out += _section(
        f"near-empty answers (< {report.min_answer_chars} letters or digits)",
        [f"line {entry.line} ({entry.task}): {entry.detail}" for entry in report.near_empty],
    )
    out += _section(
        "cot samples without reasoning",
        [f"line {entry.line}: {entry.detail}" for entry in report.cot_missing_reasoning],
    )
    out += _section(
        "near-duplicate questions (groups; warning only)",
        [_lines(group) for group in report.near_duplicate_questions],
    )
    if report.split is not None:
        split = report.split
        out.append(
            f"split: {split.train} train, {split.validation} validation "
            f"(fraction {split.validation_fraction}, seed {split.seed}; "
            f"{split.left_out_duplicates} duplicates{_flagged_note(split)} left out) in {split.directory}"
        )
    out.append("")
    out += [f"warning: {warning}" for warning in report.warnings]
    if report.passed:
        out.append("result: passed")
    else:
        out.append(f"result: FAILED: {'; '.join(report.problems)}")
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student dataset`: one action, `check`."""
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check",
        help="check a chat JSONL file for training and optionally write a train/validation split",
        description="Check a chat JSONL file for LoRA training: samples per task against a minimum, "
        "malformed lines, exact duplicates, near-empty answers, cot samples without reasoning, and "
        "near-duplicate questions (a warning). Exits 1 when a problem is found.",
    )
    check.add_argument("file", type=Path, metavar="FILE.jsonl", help='chat "messages" JSONL')
    check.add_argument(
        "--min-per-task",
        type=int,
        default=DEFAULT_MIN_PER_TASK,
        help="samples each task needs (default: %(default)s, the article's minimum)",
    )
    check.add_argument(
        "--allow-small", action="store_true", help="a task below --min-per-task is a warning, not a failure"
    )
    check.add_argument(
        "--min-answer-chars",
        type=int,
        default=DEFAULT_MIN_ANSWER_CHARS,
        help="an assistant answer with fewer letters or digits (outside <think>) is near-empty (default: %(default)s)",
    )
    check.add_argument(
        "--split-out",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"write {TRAIN_FILE} and {VALIDATION_FILE} there (rewritten on every run)",
    )
    check.add_argument(
        "--drop-flagged",
        action="store_true",
        help="leave samples with a near-empty answer and cot samples without reasoning out of the split "
        "(the check still reports them)",
    )
    check.add_argument(
        "--validation-fraction",
        type=float,
        default=DEFAULT_VALIDATION_FRACTION,
        help="share of questions that go to validation (default: %(default)s)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of the split's hash (default: %(default)s)")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    """`student dataset check`: 0 when the data passes, 1 on problems or when it cannot be read."""
    try:
        report = check_dataset(
            args.file,
            min_per_task=args.min_per_task,
            allow_small=args.allow_small,
            min_answer_chars=args.min_answer_chars,
            split_out=args.split_out,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
            drop_flagged=args.drop_flagged,
        )
    except (CheckError, OSError) as error:
        print(f"student dataset check: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_json(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0 if report.passed else 1
