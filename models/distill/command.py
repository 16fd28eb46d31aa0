"""`student distill`: training data from a teacher model, resumable, in chat "messages" JSONL.

Three modes, after the distillation article this project follows:

- `response`: for each topic (Vietnamese e-commerce support topics; `models/data/distill_topics.txt`
  by default) the teacher writes `--questions-per-topic` customer questions (up to 10 per request,
  one per line; asked again until the count is reached, a topic fails after 3 requests in a row
  bring no new question), then answers each. A sample is `[system, user: question, assistant:
  answer]`; any reasoning the teacher shows is dropped (answers only).
- `cot`: the same, with questions that need several steps of reasoning, and the teacher's reasoning
  kept apart from its final answer: taken from `message.reasoning_content` / `message.reasoning`
  when the server separates it (vLLM with a reasoning parser, DeepSeek), else split out of
  `<think>…</think>` in the content. The request's system turn asks for `<think>` reasoning; the
  sample keeps the plain `--system-prompt`, as the student will see it. The assistant turn is
  `<think>\\nREASONING\\n</think>\\n\\nANSWER` and the row also carries `reasoning` (the text
  alone). A reply without reasoning is **kept, flagged** `"missing_reasoning": true` (assistant
  turn = the answer alone, `reasoning` null) and counted in the manifest, so that `student dataset
  check` reports it and the plan's count still holds; a rerun would only get the same reply back
  (requests are seeded). Drop such rows at training time if the reasoning matters more than the
  count.
- `multitask`: from the shop's documents (`--documents DIR`, `.txt`/`.md`, default
  `models/data/shop_docs/`), cut into chunks of at most `--chunk-chars`; per chunk one sample per
  task: `summary`, `qa` (five Q/A pairs), `classify` (one of technical, policy, guide, promotion,
  other; the label found in the reply goes into `label`, null if none) and `extract` (JSON).

Output folder (`--out`):

- `samples.jsonl`: one object per line, `{"messages": [...], "task", "topic", "id", ...}`, which
  `models.chat_data.load_chat_jsonl` reads as is (extra keys are ignored there), in the order the
  replies came back (concurrency), not plan order; `finish_reason` says whether a reply was cut.
- `questions.jsonl` (response/cot): the generated questions, so a resumed run answers the same ones.
- `plan.json`: what defines the run (mode, teacher URL and model, generation settings, inputs, the
  planned sample ids). Resuming into a folder whose plan differs is refused; `--force` starts over.
- `manifest.json`: teacher (URL and model, never the key), mode, planned/done/failed/missing,
  counts per task, `truncated` (replies cut at `--max-tokens`), `missing_reasoning` (cot),
  `unlabelled` (classify), tokens from the server's `usage`, retries by reason, cost in USD at the
  given prices (each run at its own), one entry per run with its times and status, and this run's
  failures with their errors.

Resuming: the plan is deterministic (ids like `response/theo-doi-don-hang/0007` come from the mode,
topic and index; request seeds from `--seed` and the id), every sample is appended as one complete
line followed by fsync, and a run reads what is already there (a torn last line left by a SIGKILL is
cut off) and only asks for what is missing. A killed-and-restarted run thus ends with exactly the
planned samples. A sample that fails (retries exhausted, empty reply) is listed in the manifest and
the run exits 1; the next run with the same command asks for it again. A refused key, an unknown
model or URL (401/403/404) stops the run at once.

Tokens of replies that a kill interrupted are lost (the server's `usage` never arrived); everything
else is in the manifest, which is rewritten after every sample.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from models.arguments import non_negative_float, non_negative_int, positive_float, positive_int
from models.distill.output import MANIFEST_FILE, PLAN_FILE, QUESTIONS_FILE, SAMPLES_FILE, OutputFolder
from models.distill.plan import (
    SYSTEM_PROMPT,
    TASKS,
    DistillError,
    Generation,
    Plan,
    PlannedSample,
    Topic,
    load_documents,
    load_topics,
    plan_differences,
    plan_multitask,
    plan_questions,
    plan_record,
    request_seed,
)
from models.distill.prompts import (
    cot_assistant_content,
    extract_label,
    parse_questions,
    question_key,
    question_messages,
    split_reasoning,
    task_messages,
)
from models.distill.teacher import (
    ChatReply,
    Price,
    RetryPolicy,
    TeacherClient,
    TeacherConfig,
    TeacherError,
    TeacherRejectedError,
    TeacherReplyError,
    TeacherUnavailableError,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_TOPICS_FILE = DATA_DIR / "distill_topics.txt"
DEFAULT_DOCUMENTS_DIR = DATA_DIR / "shop_docs"
DEFAULT_KEY_ENV = "STUDENT_TEACHER_API_KEY"

MODES = ("response", "cot", "multitask")
# The article's max_tokens per kind of request: answers 2000, chain of thought 4000, multitask 1500.
DEFAULT_MAX_TOKENS = {"response": 2000, "cot": 4000, "multitask": 1500}
DEFAULT_TEMPERATURE = 0.7
QUESTIONS_PER_REQUEST = 10  # questions asked for in one request; more come in later rounds
FRUITLESS_QUESTION_ROUNDS = 3  # a topic gives up after this many requests in a row with no new question

MANIFEST_FORMAT = "student-distill-manifest/1"

COT_INSTRUCTION = (
    " Trước khi trả lời, hãy suy nghĩ từng bước trong thẻ <think>…</think>, "
    "sau đó viết câu trả lời cuối cùng cho khách hàng."
)


class PlanMismatchError(DistillError):
    """The output folder holds a run with another plan, teacher or mode."""


class SampleError(Exception):
    """One sample cannot be made in this run (e.g. its question is missing); it stays to do."""


# ---------------------------------------------------------------------------------------------
# The run


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Failure:
    id: str
    task: str
    topic: str
    error: str
    attempts: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "topic": self.topic, "error": self.error, "attempts": self.attempts}


@dataclass(frozen=True)
class DistillResult:
    """What a run ended with; `complete` when every planned sample is in samples.jsonl."""

    out_dir: Path
    planned: int
    done: int
    failed: int
    manifest: dict[str, Any]

    @property
    def complete(self) -> bool:
        return self.done == self.planned

    @property
    def samples_path(self) -> Path:
        return self.out_dir / SAMPLES_FILE


def stderr_note(message: str) -> None:
    print(f"[distill] {message}", file=sys.stderr, flush=True)


class _Bar:
    """A tqdm progress bar on stderr (or nothing), with retry/failure counts as its postfix."""

    def __init__(self, enabled: bool, total: int, description: str, unit: str):
        self._bar = None
        if enabled and total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def advance(self, retries: int, failed: int) -> None:
        if self._bar is not None:
            self._bar.set_postfix(retries=retries, failed=failed, refresh=False)
            self._bar.update(1)

    def write(self, message: str) -> bool:
        if self._bar is None:
            return False
        self._bar.write(message, file=sys.stderr)
        return True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Run:
    """One invocation: the plan, what the folder already holds, the teacher, and the manifest."""

    def __init__(
        self,
        plan: Plan,
        generation: Generation,
        teacher: TeacherClient,
        folder: OutputFolder,
        record: dict[str, Any],
        price: Price,
        concurrency: int,
        show_progress: bool,
    ):
        self.plan = plan
        self.generation = generation
        self.teacher = teacher
        self.folder = folder
        self.record = record
        self.price = price
        self.concurrency = concurrency
        self.show_progress = show_progress
        self.started_at = _now_iso()
        self.rows: dict[str, dict[str, Any]] = {}
        self.task_counts: Counter[str] = Counter()
        self.missing_reasoning = 0
        self.unlabelled = 0
        self.truncated = 0
        self.questions: dict[str, list[str]] = {topic.key: [] for topic in plan.topics}
        self.failures: dict[str, Failure] = {}  # planned sample id -> why it failed in this run
        self.question_failures: dict[str, Failure] = {}  # topic key -> why its questions fell short
        self.fatal: TeacherError | None = None
        self.error: str | None = None
        self.previous: dict[str, Any] = {}
        self.written = 0
        self._bar: _Bar | None = None
        self._retry_reasons_noted: set[str] = set()

    # -- state on disk --

    def load(self) -> None:
        planned = {sample.id for sample in self.plan.samples}
        for row in self.folder.read_jsonl(SAMPLES_FILE):
            sample_id = row.get("id")
            if sample_id not in planned:
                raise DistillError(
                    f"{self.folder.file(SAMPLES_FILE)} holds id {sample_id!r}, which is not in the plan; "
                    "start over with --force"
                )
            if sample_id not in self.rows:
                self.add_row(row)
        by_topic: dict[str, dict[int, str]] = {key: {} for key in self.questions}
        for row in self.folder.read_jsonl(QUESTIONS_FILE):
            key, index, question = row.get("topic_key"), row.get("index"), row.get("question")
            if (
                key not in by_topic
                or not isinstance(index, int)
                or not isinstance(question, str)
                or index in by_topic[key]
            ):
                raise DistillError(
                    f"{self.folder.file(QUESTIONS_FILE)} has an unexpected row {row!r}; start over with --force"
                )
            by_topic[key][index] = question
        for key, found in by_topic.items():
            if sorted(found) != list(range(len(found))):
                raise DistillError(
                    f"{self.folder.file(QUESTIONS_FILE)}: questions of {key!r} are not numbered 0..n-1; "
                    "start over with --force"
                )
            self.questions[key] = [found[index] for index in range(len(found))]
        self.previous = self.folder.read_json(MANIFEST_FILE) or {}

    def add_row(self, row: dict[str, Any]) -> None:
        """Count a sample that is in samples.jsonl (read back or just written)."""
        self.rows[row["id"]] = row
        self.task_counts[str(row.get("task"))] += 1
        self.missing_reasoning += bool(row.get("missing_reasoning"))
        self.unlabelled += row.get("task") == "classify" and row.get("label") is None
        self.truncated += row.get("finish_reason") == "length"

    def manifest(self, status: str) -> dict[str, Any]:
        """The manifest now: totals over every run so far, this run's entry last."""
        usage = self.teacher.usage.as_dict()
        this_run = {
            "started_at": self.started_at,
            "finished_at": None if status == "running" else _now_iso(),
            "status": status,
            "samples_written": self.written,
            "failed": len(self.failures),
            "error": self.error,
            "usage": usage,
            "price": {
                "input_usd_per_mtok": self.price.input_usd_per_mtok,
                "output_usd_per_mtok": self.price.output_usd_per_mtok,
            },
            "cost_usd": round(self.price.cost_usd(usage["prompt_tokens"], usage["completion_tokens"]), 6),
        }
        earlier = [dict(run) for run in self.previous.get("runs", []) if isinstance(run, dict)]
        for run in earlier:
            if run.get("status") == "running":
                run["status"] = "interrupted"  # we hold the folder's lock, so that process is gone
        runs = [*earlier, this_run]
        totals: Counter[str] = Counter()
        retries_by_reason: Counter[str] = Counter()
        cost_usd = 0.0
        for run in runs:
            run_usage = run.get("usage", {})
            for name in (
                "requests",
                "replies",
                "retries",
                "replies_without_usage",
                "prompt_tokens",
                "completion_tokens",
            ):
                totals[name] += int(run_usage.get(name, 0))
            retries_by_reason.update(run_usage.get("retries_by_reason", {}))
            cost_usd += float(run.get("cost_usd", 0.0))
        done = len(self.rows)
        manifest: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "status": status,
            "mode": self.plan.mode,
            "teacher": dict(self.record["teacher"]),
            "samples_file": SAMPLES_FILE,
            "plan_file": PLAN_FILE,
            "planned": len(self.plan.samples),
            "done": done,
            "failed": len(self.failures),
            "missing": len(self.plan.samples) - done,
            "planned_by_task": self.plan.by_task(),
            "counts_by_task": {task: self.task_counts.get(task, 0) for task in self.plan.by_task()},
            "truncated": self.truncated,
        }
        if self.plan.mode == "cot":
            manifest["missing_reasoning"] = self.missing_reasoning
        if "classify" in self.plan.by_task():
            manifest["unlabelled"] = self.unlabelled
        if self.plan.topics:
            manifest["questions"] = {
                "planned": len(self.plan.topics) * self.plan.questions_per_topic,
                "done": sum(min(len(found), self.plan.questions_per_topic) for found in self.questions.values()),
            }
        manifest.update(
            {
                "usage": {**dict(totals), "retries_by_reason": dict(sorted(retries_by_reason.items()))},
                "price": this_run["price"],
                "cost_usd": round(cost_usd, 6),
                "started_at": runs[0].get("started_at"),
                "finished_at": this_run["finished_at"],
                "runs": runs,
                "failures": [
                    failure.as_dict() for failure in [*self.question_failures.values(), *self.failures.values()]
                ],
                "error": self.error,
            }
        )
        return manifest

    def save_manifest(self, status: str = "running") -> dict[str, Any]:
        manifest = self.manifest(status)
        self.folder.write_json(MANIFEST_FILE, manifest)
        return manifest

    # -- the work --

    def on_retry(self, reason: str, delay_s: float, retry: int) -> None:
        """Say once per reason that the teacher is pushing back; the bar counts the rest."""
        if reason in self._retry_reasons_noted:
            return
        self._retry_reasons_noted.add(reason)
        message = f"[distill] teacher: {reason}; retrying in {delay_s:.1f} s (retries are counted in the manifest)"
        if self._bar is None or not self._bar.write(message):
            print(message, file=sys.stderr, flush=True)

    def fail(self, sample_id: str, task: str, topic: str, error: str, attempts: int = 0) -> None:
        failure = Failure(sample_id, task, topic, error, attempts)
        if task == "questions":
            self.question_failures[sample_id] = failure
        else:
            self.failures[sample_id] = failure

    async def _pool(self, jobs: Sequence[Callable[[], Awaitable[None]]]) -> None:
        """Run `jobs` on `concurrency` workers; stop taking new ones after a fatal teacher error."""
        pending = iter(jobs)

        async def worker() -> None:
            for job in pending:
                if self.fatal is not None:
                    return
                await job()

        tasks = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(jobs)))]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _guard(self, sample_id: str, task: str, topic: str, call: Callable[[], Awaitable[None]]) -> None:
        """Run one unit of work, turning teacher errors into recorded failures (or a fatal stop)."""
        try:
            await call()
        except TeacherRejectedError as error:
            if error.fatal:
                self.fatal = self.fatal or error
            self.fail(sample_id, task, topic, str(error))
        except TeacherUnavailableError as error:
            self.fail(sample_id, task, topic, str(error), error.attempts)
        except (TeacherError, SampleError) as error:
            self.fail(sample_id, task, topic, str(error))

    async def generate_questions(self) -> None:
        """Phase 1 (response/cot): fill every topic's question list up to `questions_per_topic`."""
        wanted = self.plan.questions_per_topic
        missing_topics = [topic for topic in self.plan.topics if len(self.questions[topic.key]) < wanted]
        if not missing_topics:
            return
        self._bar = _Bar(self.show_progress, len(missing_topics), "questions", "topic")
        try:
            jobs = [self._questions_job(topic) for topic in missing_topics]
            await self._pool(jobs)
        finally:
            self._bar.close()
            self._bar = None

    def _questions_job(self, topic: Topic) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            await self._guard(f"questions/{topic.key}", "questions", topic.text, lambda: self._fill_questions(topic))
            if len(self.questions[topic.key]) >= self.plan.questions_per_topic:
                self.question_failures.pop(f"questions/{topic.key}", None)
            self.save_manifest()
            if self._bar is not None:
                self._bar.advance(self.teacher.usage.retries, len(self.failures))

        return job

    async def _fill_questions(self, topic: Topic) -> None:
        """Ask for up to QUESTIONS_PER_REQUEST questions at a time until the topic has its count.

        Each new question is appended to questions.jsonl before anything uses it. A teacher that
        gives fewer lines than asked is asked again; after FRUITLESS_QUESTION_ROUNDS requests in a
        row without a new (non-duplicate) question the topic fails, and the next run tries again.
        """
        wanted = self.plan.questions_per_topic
        known = self.questions[topic.key]
        seen = {question_key(question) for question in known}
        fruitless = requests = 0
        while len(known) < wanted and fruitless < FRUITLESS_QUESTION_ROUNDS:
            count = min(wanted - len(known), QUESTIONS_PER_REQUEST)
            reply = await self.teacher.chat(
                question_messages(self.plan.mode, topic.text, count, known),
                max_tokens=self.generation.max_tokens,
                temperature=self.generation.temperature,
                seed=request_seed(self.generation.seed, f"questions/{topic.key}/{len(known)}/{fruitless}"),
            )
            requests += 1
            fresh: list[str] = []
            for question in parse_questions(split_reasoning(reply.content, reply.reasoning).answer):
                if question_key(question) not in seen and len(fresh) < count:
                    seen.add(question_key(question))
                    fresh.append(question)
            rows = [
                {"topic_key": topic.key, "topic": topic.text, "index": len(known) + offset, "question": question}
                for offset, question in enumerate(fresh)
            ]
            self.folder.append_jsonl(QUESTIONS_FILE, rows)
            known.extend(fresh)
            fruitless = 0 if fresh else fruitless + 1
        if len(known) < wanted:
            raise TeacherReplyError(
                f"the teacher gave {len(known)} of {wanted} distinct questions for topic {topic.text!r}; "
                f"the last {fruitless} of {requests} requests brought no new one (one question per line is expected)"
            )

    async def generate_samples(self) -> None:
        """Phase 2: every planned sample that samples.jsonl does not hold yet."""
        todo = [sample for sample in self.plan.samples if sample.id not in self.rows]
        if not todo or self.fatal is not None:
            return
        self._bar = _Bar(self.show_progress, len(todo), self.plan.mode, "sample")
        try:
            await self._pool([self._sample_job(sample) for sample in todo])
        finally:
            self._bar.close()
            self._bar = None

    def _sample_job(self, sample: PlannedSample) -> Callable[[], Awaitable[None]]:
        async def job() -> None:
            await self._guard(sample.id, sample.task, sample.topic, lambda: self._make_sample(sample))
            self.save_manifest()
            if self._bar is not None:
                self._bar.advance(self.teacher.usage.retries, len(self.failures))

        return job

    async def _make_sample(self, sample: PlannedSample) -> None:
        if sample.chunk is not None:
            request = task_messages(sample.task, sample.chunk)
            training_prefix = request
        else:
            questions = self.questions.get(sample.topic_key or "", [])
            if sample.index is None or sample.index >= len(questions):
                raise SampleError(f"no question #{sample.index} for topic {sample.topic!r} (see the questions failure)")
            question = {"role": "user", "content": questions[sample.index]}
            training_prefix = [{"role": "system", "content": self.generation.system_prompt}, question]
            system = self.generation.system_prompt + (COT_INSTRUCTION if sample.task == "cot" else "")
            request = [{"role": "system", "content": system}, question]
        reply = await self.teacher.chat(
            request,
            max_tokens=self.generation.max_tokens,
            temperature=self.generation.temperature,
            seed=request_seed(self.generation.seed, sample.id),
        )
        row = sample_row(sample, training_prefix, reply)
        self.folder.append_jsonl(SAMPLES_FILE, [row])
        self.add_row(row)
        self.written += 1
        self.failures.pop(sample.id, None)


def sample_row(sample: PlannedSample, prefix: Sequence[Mapping[str, str]], reply: ChatReply) -> dict[str, Any]:
    """The samples.jsonl row for a reply; `TeacherReplyError` when the reply has no answer."""
    split = split_reasoning(reply.content, reply.reasoning)
    if split.unterminated and not split.answer:
        raise TeacherReplyError(
            f"the reply was cut off inside <think> (finish_reason={reply.finish_reason}); raise --max-tokens"
        )
    if not split.answer:
        raise TeacherReplyError(f"the teacher's answer is empty (finish_reason={reply.finish_reason})")
    row: dict[str, Any] = {"id": sample.id, "task": sample.task, "topic": sample.topic}
    assistant = split.answer
    if sample.task == "cot":
        reasoning = None if split.unterminated else split.reasoning
        if reasoning:
            assistant = cot_assistant_content(reasoning, split.answer)
        row["reasoning"] = reasoning
        row["missing_reasoning"] = not reasoning
    row["messages"] = [*[dict(message) for message in prefix], {"role": "assistant", "content": assistant}]
    if sample.document is not None:
        row["document"] = sample.document
        row["chunk"] = sample.chunk_index
    if sample.task == "classify":
        row["label"] = extract_label(split.answer)
    row["finish_reason"] = reply.finish_reason
    return row


async def distill(
    plan: Plan,
    generation: Generation,
    teacher_config: TeacherConfig,
    out_dir: Path,
    price: Price | None = None,
    concurrency: int = 4,
    force: bool = False,
    show_progress: bool = True,
) -> DistillResult:
    """Generate (or complete) the plan's samples in `out_dir`; see the module docstring."""
    if concurrency < 1:
        raise DistillError("--concurrency must be at least 1")
    record = plan_record(plan, teacher_config, generation)
    folder = OutputFolder(out_dir)
    with folder.locked():
        if force:
            folder.clear()
        old = folder.read_json(PLAN_FILE)
        if old is None and (folder.file(SAMPLES_FILE).exists() or folder.file(QUESTIONS_FILE).exists()):
            raise PlanMismatchError(
                f"{out_dir} holds samples but no {PLAN_FILE}; use another --out or --force to start over"
            )
        if old is not None:
            differences = plan_differences(old, record)
            if differences:
                raise PlanMismatchError(
                    f"{out_dir} holds a run with a different plan ({', '.join(differences)} differ); "
                    "use another --out, or --force to start over"
                )
        else:
            folder.write_json(PLAN_FILE, record)
        teacher = TeacherClient(teacher_config)
        run = _Run(plan, generation, teacher, folder, record, price or Price(), concurrency, show_progress)
        teacher.on_retry = run.on_retry
        run.load()
        status = "interrupted"  # unless we get to say otherwise (Ctrl-C, a bug)
        try:
            if len(run.rows) < len(plan.samples):
                async with teacher:
                    await _preflight(teacher)
                    run.save_manifest()
                    if plan.topics:
                        await run.generate_questions()
                    await run.generate_samples()
            if run.fatal is not None:
                run.error = f"stopped: {run.fatal} (the samples so far are kept; rerun to continue)"
                raise DistillError(run.error)
            status = "complete" if len(run.rows) == len(plan.samples) else "incomplete"
        except DistillError as error:
            status, run.error = "aborted", str(error)
            raise
        finally:
            manifest = run.save_manifest(status)
    return DistillResult(out_dir, len(plan.samples), len(run.rows), len(run.failures), manifest)


async def _preflight(teacher: TeacherClient) -> None:
    """Fail once, early, on an unreachable teacher, a refused key or a model it does not serve."""
    config = teacher.config
    try:
        served = await teacher.served_models(max_connection_retries=min(2, config.retry.max_retries))
    except TeacherUnavailableError as error:
        raise DistillError(f"cannot reach the teacher: {error}") from None
    except TeacherRejectedError as error:
        raise DistillError(str(error)) from None
    if served is not None and served and config.model not in served:
        raise DistillError(
            f"teacher at {config.base_url} does not serve model {config.model!r} (it serves: {', '.join(served)})"
        )


# ---------------------------------------------------------------------------------------------
# Command line


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"top_k\": 20}'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `student distill`."""
    parser.add_argument(
        "--mode", choices=MODES, required=True, help="response, cot (keeps the reasoning) or multitask (from documents)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder: samples.jsonl, manifest.json, plan.json (resumed if it exists)",
    )
    teacher = parser.add_argument_group("teacher (any OpenAI-compatible endpoint)")
    url_default, model_default = os.environ.get("STUDENT_TEACHER_URL"), os.environ.get("STUDENT_TEACHER_MODEL")
    teacher.add_argument(
        "--teacher-url",
        default=url_default,
        required=url_default is None,
        help="API base URL, e.g. https://api.deepseek.com/v1 (env STUDENT_TEACHER_URL)",
    )
    teacher.add_argument(
        "--teacher-model",
        default=model_default,
        required=model_default is None,
        help="model name, e.g. deepseek-reasoner (env STUDENT_TEACHER_MODEL)",
    )
    teacher.add_argument(
        "--teacher-key-env",
        default=DEFAULT_KEY_ENV,
        metavar="VAR",
        help="environment variable holding the API key (default: %(default)s; unset = no key)",
    )
    teacher.add_argument(
        "--teacher-extra-body",
        type=_json_object,
        default={},
        metavar="JSON",
        help='JSON object merged into every request, e.g. vLLM\'s \'{"structured_outputs": {"regex": "..."}}\'',
    )
    teacher.add_argument(
        "--input-usd-per-mtok",
        type=non_negative_float,
        default=0.0,
        help="teacher's price per million prompt tokens, USD, for the manifest's cost (default: 0)",
    )
    teacher.add_argument(
        "--output-usd-per-mtok",
        type=non_negative_float,
        default=0.0,
        help="teacher's price per million completion tokens, USD (default: 0)",
    )
    inputs = parser.add_argument_group("what to generate")
    inputs.add_argument(
        "--topics",
        type=Path,
        default=DEFAULT_TOPICS_FILE,
        help="response/cot: topics file, one per line (default: the bundled Vietnamese support topics)",
    )
    inputs.add_argument(
        "--questions-per-topic",
        type=positive_int,
        default=150,
        help="response/cot: samples per topic (default: %(default)s; the 7 bundled topics x 150 = 1,050, "
        "over the article's 1,000 per task)",
    )
    inputs.add_argument(
        "--documents",
        type=Path,
        default=DEFAULT_DOCUMENTS_DIR,
        help="multitask: folder of .txt/.md shop documents (default: the bundled samples)",
    )
    inputs.add_argument(
        "--tasks", default=",".join(TASKS), help="multitask: comma-separated tasks (default: %(default)s)"
    )
    inputs.add_argument(
        "--chunk-chars",
        type=positive_int,
        default=2000,
        help="multitask: longest document chunk, characters (default: %(default)s)",
    )
    inputs.add_argument(
        "--system-prompt", default=SYSTEM_PROMPT, help="response/cot: the samples' system turn (default: %(default)r)"
    )
    inputs.add_argument(
        "--max-tokens", type=positive_int, help="per reply (default: response 2000, cot 4000, multitask 1500)"
    )
    inputs.add_argument(
        "--temperature", type=non_negative_float, default=DEFAULT_TEMPERATURE, help="(default: %(default)s)"
    )
    inputs.add_argument("--seed", type=int, default=0, help="base of the per-request seeds (default: %(default)s)")
    pacing = parser.add_argument_group("pacing and retries")
    pacing.add_argument(
        "--concurrency", type=positive_int, default=4, help="requests in flight at once (default: %(default)s)"
    )
    pacing.add_argument(
        "--rpm",
        type=non_negative_float,
        default=60.0,
        help="most requests started per minute, retries included; 0 = no limit (default: %(default)s)",
    )
    pacing.add_argument(
        "--max-retries",
        type=non_negative_int,
        default=5,
        help="retries of a request on 429, 5xx, timeouts and connection errors (default: %(default)s)",
    )
    pacing.add_argument(
        "--timeout-s",
        type=positive_float,
        default=300.0,
        help="longest wait for one reply, seconds (default: %(default)s)",
    )
    pacing.add_argument(
        "--backoff-base-s",
        type=non_negative_float,
        default=1.0,
        help="first backoff, seconds; doubles per retry, with jitter (default: %(default)s)",
    )
    pacing.add_argument(
        "--backoff-max-s",
        type=non_negative_float,
        default=60.0,
        help="longest backoff without Retry-After, seconds (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="start over: delete this tool's files in --out first")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def plan_from_args(args: argparse.Namespace) -> Plan:
    if args.mode == "multitask":
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        return plan_multitask(load_documents(args.documents), tasks, args.chunk_chars)
    return plan_questions(args.mode, load_topics(args.topics), args.questions_per_topic)


def teacher_config_from_args(args: argparse.Namespace) -> TeacherConfig:
    key = os.environ.get(args.teacher_key_env) or None
    try:
        return TeacherConfig(
            url=args.teacher_url,
            model=args.teacher_model,
            api_key=key,
            key_env=args.teacher_key_env,
            timeout_s=args.timeout_s,
            requests_per_minute=args.rpm or None,
            retry=RetryPolicy(args.max_retries, args.backoff_base_s, max(args.backoff_max_s, args.backoff_base_s)),
            extra_body=args.teacher_extra_body,
        )
    except ValueError as error:
        raise DistillError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    """`student distill`: 0 when every planned sample is written, 1 otherwise (with the reason)."""
    try:
        plan = plan_from_args(args)
        teacher_config = teacher_config_from_args(args)
        generation = Generation(
            max_tokens=args.max_tokens or DEFAULT_MAX_TOKENS[args.mode],
            temperature=args.temperature,
            seed=args.seed,
            system_prompt=args.system_prompt,
            extra_body=teacher_config.extra_body,
        )
        price = Price(args.input_usd_per_mtok, args.output_usd_per_mtok)
        result = asyncio.run(
            distill(
                plan, generation, teacher_config, args.out, price, args.concurrency, args.force, not args.no_progress
            )
        )
    except DistillError as error:
        print(f"student distill: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("student distill: interrupted; the samples so far are kept, rerun to continue", file=sys.stderr)
        return 130
    manifest = result.manifest
    summary = (
        f"{result.done}/{result.planned} samples in {result.samples_path}; "
        f"{manifest['usage'].get('prompt_tokens', 0)} prompt + {manifest['usage'].get('completion_tokens', 0)} "
        f"completion tokens, {manifest['usage'].get('retries', 0)} retries, ${manifest['cost_usd']:.4f}"
    )
    if "missing_reasoning" in manifest:
        summary += f", {manifest['missing_reasoning']} without reasoning"
    stderr_note(summary)
    print(result.samples_path)
    if result.complete:
        return 0
    for failure in manifest["failures"][:5]:
        stderr_note(f"failed {failure['id']}: {failure['error']}")
    print(
        f"student distill: error: {result.planned - result.done} of {result.planned} samples are missing "
        f"({result.failed} failed, see {result.out_dir / MANIFEST_FILE}); rerun the same command to retry them",
        file=sys.stderr,
    )
    return 1
