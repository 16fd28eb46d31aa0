"""`student distill`: plans, reply splitting and the output folder from strings; then every mode,
real 429s, a SIGKILL halfway and the refusals against a real teacher: the project's own stack
(gateway + vLLM) serving the tiny random model, with API keys and a per-key rate limit.

One stack serves the whole module (a vLLM start costs about 30 s of CPU). Each test uses its own
key, so the rate limiter's per-key buckets (60 requests of burst, refilled at one a second) keep
the tests apart: only the tests that empty their bucket on purpose see 429s.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.chat_data import load_chat_jsonl
from models.distill import command as distill
from models.distill.command import DEFAULT_DOCUMENTS_DIR, DEFAULT_TOPICS_FILE, sample_row
from models.distill.output import OutputFolder
from models.distill.plan import (
    SYSTEM_PROMPT,
    DistillError,
    Generation,
    PlannedSample,
    chunk_text,
    load_documents,
    load_topics,
    plan_differences,
    plan_multitask,
    plan_questions,
    slugify,
)
from models.distill.prompts import TASK_SYSTEM_PROMPTS, SplitReply, extract_label, parse_questions, split_reasoning
from models.distill.teacher import ChatReply, RetryPolicy, TeacherClient, TeacherConfig, TeacherReplyError
from tests.models.distill.test_teacher import completion, ok, scripted_teacher, status
from tests.support import STUDENT, Stack, http_get, running_stack, wait_for

RATE_LIMIT_RPM = 60
KEYS = {
    name: f"{name}-distill-test-key-0123456789"
    for name in ("response", "multitask", "cot", "burst", "client", "kill", "force", "model")
}
# Keeps the random model from ending a reply at its first token (an empty answer is a failure).
NOT_EMPTY = json.dumps({"min_tokens": 2})
# Makes the random model write `<think>words</think>words`, the format of a reasoning teacher.
THINK_REGEX = json.dumps(
    {"structured_outputs": {"regex": "<think>[a-z]{2,6}( [a-z]{2,6}){1,3}</think>[a-z]{2,6}( [a-z]{2,6}){1,3}"}}
)
TOPICS = ["theo dõi đơn hàng", "chính sách đổi trả", "mã giảm giá"]


# --- plans, prompts and replies, from strings ---


def test_slugs_drop_vietnamese_diacritics() -> None:
    assert slugify("Theo dõi đơn hàng") == "theo-doi-don-hang"
    assert slugify("Đổi size quần áo, giày dép") == "doi-size-quan-ao-giay-dep"
    assert slugify("!!!") == "x"


def test_question_plan_ids_are_deterministic_and_unique() -> None:
    plan = plan_questions("response", ["đổi trả", "Đổi trả!", "mã giảm giá"], 3)
    ids = [sample.id for sample in plan.samples]
    assert ids[:4] == [
        "response/doi-tra/0000",
        "response/doi-tra/0001",
        "response/doi-tra/0002",
        "response/doi-tra-2/0000",
    ]
    assert len(set(ids)) == 9
    assert plan_questions("response", ["đổi trả", "Đổi trả!", "mã giảm giá"], 3) == plan
    assert plan.by_task() == {"response": 9}
    with pytest.raises(DistillError, match="at least 1"):
        plan_questions("cot", ["x"], 0)


def test_bundled_topics_and_documents_load() -> None:
    topics = load_topics(DEFAULT_TOPICS_FILE)
    card_topics = json.loads((DEFAULT_TOPICS_FILE.parent / "shop_card.json").read_text(encoding="utf-8"))["topics"]
    assert "theo dõi đơn hàng" in topics and "mã giảm giá" in topics and len(topics) == len(card_topics)
    documents = load_documents(DEFAULT_DOCUMENTS_DIR)
    assert len(documents) >= 2 and all(document.name.endswith(".md") for document in documents)
    plan = plan_multitask(documents, ["summary", "qa", "classify", "extract"], 2000)
    assert plan.by_task() == {task: len(documents) for task in ("summary", "qa", "classify", "extract")}


def test_topics_file_comments_duplicates_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "topics.txt"
    path.write_text("# comment\n\n  giao hàng   trễ \nGiao hàng trễ\nbảo hành\n", encoding="utf-8")
    assert load_topics(path) == ["giao hàng trễ", "bảo hành"]
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(DistillError, match="has no topics"):
        load_topics(path)
    with pytest.raises(DistillError, match="does not exist"):
        load_topics(tmp_path / "missing.txt")


def test_documents_folder_must_hold_text(tmp_path: Path) -> None:
    (tmp_path / "empty.md").write_text("  \n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(DistillError, match="no non-empty"):
        load_documents(tmp_path)
    with pytest.raises(DistillError, match="does not exist"):
        load_documents(tmp_path / "nowhere")


def test_chunks_pack_paragraphs_and_cut_long_ones() -> None:
    text = "a" * 50 + "\n\n" + "b" * 50 + "\n\n" + " ".join(["word"] * 100)
    chunks = chunk_text(text, 120)
    assert chunks[0] == "a" * 50 + "\n\n" + "b" * 50
    assert all(len(chunk) <= 120 for chunk in chunks)
    assert " ".join(chunk for chunk in chunks[1:]).split() == ["word"] * 100


def test_questions_are_parsed_one_per_line_without_numbering() -> None:
    reply = (
        '1. Đơn hàng của tôi đâu?\n- "Khi nào giao?"\nQ3: Đổi trả thế nào?\nA3: Trong 30 ngày.\n\n•  \n'
        "Câu 4: Có COD không?"
    )
    assert parse_questions(reply) == ["Đơn hàng của tôi đâu?", "Khi nào giao?", "Đổi trả thế nào?", "Có COD không?"]


def test_reasoning_is_split_from_the_answer() -> None:
    assert split_reasoning("<think>\nxét size\n</think>\n\nĐổi size 43.") == SplitReply("xét size", "Đổi size 43.")
    assert split_reasoning("xét size</think>Đổi size 43.").reasoning == "xét size"  # R1: opening tag in the prompt
    assert split_reasoning("Đổi size 43.", reasoning="xét size") == SplitReply("xét size", "Đổi size 43.")
    assert split_reasoning("Chỉ trả lời.") == SplitReply(None, "Chỉ trả lời.")
    assert split_reasoning("<think></think>Trả lời").reasoning is None
    cut = split_reasoning("<think>đang nghĩ dở")
    assert cut.unterminated and cut.answer == "" and cut.reasoning == "đang nghĩ dở"


def test_classify_labels_are_found_in_english_or_vietnamese() -> None:
    assert extract_label("policy") == "policy"
    assert extract_label("Nhãn: khuyến mãi.") == "promotion"
    assert extract_label("Hướng dẫn, không phải kỹ thuật") == "guide"
    assert extract_label("không rõ") is None


def _reply(content: str, reasoning: str | None = None) -> ChatReply:
    return ChatReply(content, reasoning, "stop", 10, 5, 1)


def test_cot_rows_keep_reasoning_or_are_flagged() -> None:
    sample = PlannedSample("cot/x/0000", "cot", "x", "x", 0)
    prefix = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    row = sample_row(sample, prefix, _reply("Đổi size 43.", reasoning="xét size"))
    assert row["messages"][-1] == {"role": "assistant", "content": "<think>\nxét size\n</think>\n\nĐổi size 43."}
    assert (row["reasoning"], row["missing_reasoning"]) == ("xét size", False)
    flagged = sample_row(sample, prefix, _reply("Đổi size 43."))
    assert flagged["messages"][-1]["content"] == "Đổi size 43."
    assert (flagged["reasoning"], flagged["missing_reasoning"]) == (None, True)
    with pytest.raises(TeacherReplyError, match="max-tokens"):
        sample_row(sample, prefix, _reply("<think>nghĩ mãi"))
    with pytest.raises(TeacherReplyError, match="empty"):
        sample_row(sample, prefix, _reply("  "))


def test_plan_differences_name_the_fields() -> None:
    old = {"mode": "response", "teacher": {"url": "u", "model": "a"}, "inputs": {"topics": ["x"]}}
    new = {"mode": "cot", "teacher": {"url": "u", "model": "b"}, "inputs": {"topics": ["x"]}}
    assert plan_differences(old, new) == ["mode", "teacher.model"]
    assert plan_differences(old, old) == []


def test_a_torn_last_line_is_cut_off_and_a_complete_one_kept(tmp_path: Path) -> None:
    folder = OutputFolder(tmp_path)
    path = tmp_path / "samples.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "messa')
    assert [row["id"] for row in folder.read_jsonl("samples.jsonl")] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}')  # killed between the row and its newline
    assert [row["id"] for row in folder.read_jsonl("samples.jsonl")] == ["a", "b"]
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(b'{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DistillError, match="line 2 is not valid JSON"):
        folder.read_jsonl("samples.jsonl")


# --- failures and stops, against a scripted teacher (tests/models/distill/test_teacher.py's) ---


def run_scripted(
    tmp_path: Path, script: list, out: Path, port: int
) -> tuple[distill.DistillResult | DistillError, list[dict]]:
    """One multitask run (1 document x summary, classify; one request at a time) against `script`.

    The teacher's URL is part of the plan, so runs that resume one another use the same `port`.
    """
    documents = tmp_path / "docs"
    documents.mkdir(exist_ok=True)
    (documents / "doi-tra.md").write_text("Đổi trả trong 30 ngày, sản phẩm còn nguyên seal.", encoding="utf-8")
    plan = plan_multitask(load_documents(documents), ["summary", "classify"], 2000)
    generation = Generation(max_tokens=16, temperature=0.0, seed=0)

    async def scenario() -> tuple[distill.DistillResult | DistillError, list[dict]]:
        async with scripted_teacher(script, models=["teacher"], port=port) as server:
            teacher_config = TeacherConfig(url=server.url, model="teacher", retry=RetryPolicy(0, 0.01, 0.01))
            try:
                result: distill.DistillResult | DistillError = await distill.distill(
                    plan, generation, teacher_config, out, concurrency=1, show_progress=False
                )
            except DistillError as error:
                result = error
        return result, server.requests

    return asyncio.run(scenario())


def test_failed_samples_are_recorded_and_asked_again_by_the_next_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    port = closed_port()
    result, requests = run_scripted(tmp_path, [status(503, message="overloaded"), ok(completion("policy"))], out, port)
    assert isinstance(result, distill.DistillResult) and (result.done, result.failed) == (1, 1)
    manifest = manifest_of(out)
    assert (manifest["status"], manifest["done"], manifest["failed"], manifest["missing"]) == ("incomplete", 1, 1, 1)
    (failure,) = manifest["failures"]
    assert failure["id"] == "multitask/doi-tra/000/summary" and "HTTP 503: overloaded" in failure["error"]
    assert [row["id"] for row in rows_of(out)] == ["multitask/doi-tra/000/classify"]
    assert rows_of(out)[0]["label"] == "policy"

    result, requests = run_scripted(tmp_path, [ok(completion("Đổi trả 30 ngày."))], out, port)
    assert isinstance(result, distill.DistillResult) and result.complete and result.failed == 0
    assert [request["body"]["messages"][1]["content"][:8] for request in requests] == [
        "Tóm tắt "
    ]  # only the missing one
    manifest = manifest_of(out)
    assert (manifest["status"], manifest["done"], manifest["failures"]) == ("complete", 2, [])
    assert [run["status"] for run in manifest["runs"]] == ["incomplete", "complete"]
    assert (manifest["usage"]["retries"], manifest["usage"]["replies"], manifest["usage"]["requests"]) == (0, 2, 5)


def test_an_empty_answer_is_a_failure_not_a_sample(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result, _ = run_scripted(tmp_path, [ok(completion("   ")), ok(completion("guide"))], out, closed_port())
    assert isinstance(result, distill.DistillResult) and (result.done, result.failed) == (1, 1)
    assert "answer is empty" in manifest_of(out)["failures"][0]["error"]


def test_a_refused_key_mid_run_stops_at_once_and_keeps_what_was_written(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result, requests = run_scripted(tmp_path, [status(401, message="key revoked")], out, closed_port())
    assert isinstance(result, DistillError) and "stopped" in str(result) and "HTTP 401: key revoked" in str(result)
    assert len(requests) == 1  # the second sample was never asked for
    manifest = manifest_of(out)
    assert (manifest["status"], manifest["done"]) == ("aborted", 0) and "key revoked" in manifest["error"]


# --- the command line, before any teacher is needed ---


def run_cli(*args: str, key: str | None = None, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("STUDENT_TEACHER")}
    if key is not None:
        env["STUDENT_TEACHER_API_KEY"] = key
    return subprocess.run(
        [STUDENT, "distill", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bad_inputs_fail_clearly_without_a_teacher(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    common = ["--teacher-url", url, "--teacher-model", "m", "--no-progress"]
    empty = tmp_path / "topics.txt"
    empty.write_text("\n# nothing\n", encoding="utf-8")
    result = run_cli("--mode", "response", "--out", str(tmp_path / "a"), "--topics", str(empty), *common)
    assert result.returncode == 1 and "has no topics" in result.stderr

    result = run_cli(
        "--mode", "multitask", "--out", str(tmp_path / "b"), "--documents", str(tmp_path / "none"), *common
    )
    assert result.returncode == 1 and "does not exist" in result.stderr

    result = run_cli("--mode", "cot", "--out", str(tmp_path / "c"), "--teacher-extra-body", "[1]", *common)
    assert result.returncode == 2 and "JSON object" in result.stderr

    result = run_cli("--mode", "cot", "--out", str(tmp_path / "c"), "--teacher-extra-body", '{"model": "x"}', *common)
    assert result.returncode == 1 and "may not set model" in result.stderr

    result = run_cli(
        "--mode", "response", "--out", str(tmp_path / "d"), "--max-retries", "1", "--backoff-base-s", "0.05", *common,
        key="sk-secret-0123456789abcdef",
    )  # fmt: skip
    assert result.returncode == 1 and "cannot reach the teacher" in result.stderr
    assert "sk-secret" not in result.stderr + result.stdout
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["status"] == "aborted" and "cannot reach" in manifest["error"] and manifest["done"] == 0


# --- against a real teacher: the project's stack on the tiny model ---


@pytest.fixture(scope="module")
def teacher(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A gateway of its own, with one API key per test and a per-key rate limit, in front of the
    session's vLLM on the tiny model (started with the same STACK_ARGS)."""
    env = {"STUDENT_API_KEYS": ",".join(f"{name}={key}" for name, key in KEYS.items())}
    args = ["--upstream", stack.vllm_url, "--rate-limit-rpm", str(RATE_LIMIT_RPM)]
    log_path = tmp_path_factory.mktemp("teacher") / "serve.log"
    with running_stack(args, log_path, env) as running:
        yield running


def teacher_args(stack: Stack, *extra: str) -> list[str]:
    return [
        "--teacher-url", f"{stack.url}/v1", "--teacher-model", "student", "--max-tokens", "16",
        "--rpm", "0", "--no-progress", "--backoff-base-s", "0.2", *extra,
    ]  # fmt: skip


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").split("\n") if line]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def questions_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "questions.jsonl").read_text(encoding="utf-8").split("\n") if line]


def write_topics(tmp_path: Path, topics: list[str]) -> Path:
    path = tmp_path / "topics.txt"
    path.write_text("\n".join(topics) + "\n", encoding="utf-8")
    return path


def assert_no_key_anywhere(out: Path, *texts: str) -> None:
    for path in out.iterdir():
        if path.is_file():
            texts = (*texts, path.read_text(encoding="utf-8", errors="replace"))
    assert not any(key in text for key in KEYS.values() for text in texts)


def drain_bucket(stack: Stack, key: str) -> str | None:
    """Spend `key`'s rate-limit burst with cheap GET /v1/models until a 429; returns its Retry-After."""
    import urllib.error
    import urllib.request

    for _ in range(RATE_LIMIT_RPM + 20):
        request = urllib.request.Request(f"{stack.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=10):
                continue
        except urllib.error.HTTPError as error:
            assert error.code == 429, error.read()
            return error.headers.get("Retry-After")
    raise AssertionError(f"no 429 after {RATE_LIMIT_RPM + 20} requests")


def test_response_mode_writes_chat_jsonl_and_a_manifest(teacher: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    topics = write_topics(tmp_path, TOPICS[:2])
    args = [
        "--mode", "response", "--out", str(out), "--topics", str(topics), "--questions-per-topic", "3",
        "--input-usd-per-mtok", "0.28", "--output-usd-per-mtok", "0.42", "--teacher-extra-body", NOT_EMPTY,
        "--concurrency", "3",
    ]  # fmt: skip
    result = run_cli(*args, *teacher_args(teacher), key=KEYS["response"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "samples.jsonl")

    rows = rows_of(out)
    expected_ids = {
        f"response/{slug}/{index:04d}" for slug in ("theo-doi-don-hang", "chinh-sach-doi-tra") for index in range(3)
    }
    assert {row["id"] for row in rows} == expected_ids and len(rows) == 6
    samples = load_chat_jsonl(out / "samples.jsonl")
    assert [sample.topic for sample in samples] == [row["topic"] for row in rows]
    questions = {(row["topic_key"], row["index"]): row["question"] for row in questions_of(out)}
    for row in rows:
        assert [message["role"] for message in row["messages"]] == ["system", "user", "assistant"]
        assert row["messages"][0]["content"] == SYSTEM_PROMPT and row["task"] == "response"
        _, topic_key, index = row["id"].split("/")
        assert row["messages"][1]["content"] == questions[(topic_key, int(index))]
        assert row["messages"][2]["content"].strip()

    manifest = manifest_of(out)
    assert manifest["teacher"] == {"url": f"{teacher.url}/v1", "model": "student"}
    assert (manifest["status"], manifest["mode"], manifest["planned"], manifest["done"], manifest["failed"]) == (
        "complete", "response", 6, 6, 0,
    )  # fmt: skip
    assert manifest["counts_by_task"] == {"response": 6} and manifest["questions"] == {"planned": 6, "done": 6}
    usage = manifest["usage"]
    assert usage["replies"] >= 6 + 2 and usage["prompt_tokens"] > 0 and usage["completion_tokens"] >= 2 * 6
    expected_cost = (usage["prompt_tokens"] * 0.28 + usage["completion_tokens"] * 0.42) / 1e6
    assert manifest["cost_usd"] == pytest.approx(expected_cost, abs=1e-6)
    assert manifest["started_at"] and manifest["finished_at"]
    assert_no_key_anywhere(out, result.stderr, result.stdout)

    before = (out / "samples.jsonl").read_bytes()
    again = run_cli(*args, *teacher_args(teacher), key=KEYS["response"])
    assert again.returncode == 0, again.stderr
    assert (out / "samples.jsonl").read_bytes() == before
    assert manifest_of(out)["runs"][-1]["usage"]["requests"] == 0  # nothing left to ask


def test_multitask_mode_from_the_bundled_documents(teacher: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--mode", "multitask", "--out", str(out), "--teacher-extra-body", NOT_EMPTY, "--concurrency", "3"]
    result = run_cli(*args, *teacher_args(teacher), key=KEYS["multitask"])
    assert result.returncode == 0, result.stderr

    documents = load_documents(DEFAULT_DOCUMENTS_DIR)
    rows = rows_of(out)
    assert len(load_chat_jsonl(out / "samples.jsonl")) == len(rows) == 4 * len(documents)
    manifest = manifest_of(out)
    assert manifest["counts_by_task"] == {task: len(documents) for task in ("summary", "qa", "classify", "extract")}
    assert manifest["unlabelled"] == sum(1 for row in rows if row["task"] == "classify" and row["label"] is None)
    texts = {document.name: document.text for document in documents}
    for row in rows:
        assert row["id"] == f"multitask/{slugify(row['document'].removesuffix('.md'))}/000/{row['task']}"
        assert row["messages"][0]["content"] == TASK_SYSTEM_PROMPTS[row["task"]]
        assert texts[row["document"]] in row["messages"][1]["content"]
        assert ("label" in row) == (row["task"] == "classify")


def test_cot_keeps_the_reasoning_apart_from_the_answer(teacher: Stack, tmp_path: Path) -> None:
    out = tmp_path / "cot"
    topics = write_topics(tmp_path, TOPICS[:2])
    args = ["--mode", "cot", "--topics", str(topics), "--questions-per-topic", "2", "--concurrency", "2"]
    result = run_cli(
        *args, "--out", str(out), *teacher_args(teacher, "--max-tokens", "96", "--teacher-extra-body", THINK_REGEX),
        key=KEYS["cot"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = rows_of(out)
    assert len(load_chat_jsonl(out / "samples.jsonl")) == len(rows) == 4
    for row in rows:
        reasoning, assistant = row["reasoning"], row["messages"][-1]["content"]
        assert reasoning and row["missing_reasoning"] is False and "<think>" not in reasoning
        answer = assistant.removeprefix(f"<think>\n{reasoning}\n</think>\n\n")
        assert answer != assistant and answer.strip() and "think>" not in answer
        assert "<think>" not in row["messages"][1]["content"]  # the question is the reply's answer part
    assert manifest_of(out)["missing_reasoning"] == 0

    # Without the format the random model gives no reasoning: kept, flagged and counted.
    plain = tmp_path / "plain"
    result = run_cli(
        *args, "--out", str(plain), *teacher_args(teacher, "--teacher-extra-body", NOT_EMPTY), key=KEYS["cot"]
    )
    assert result.returncode == 0, result.stderr
    rows = rows_of(plain)
    assert len(rows) == 4 and all(row["missing_reasoning"] is True and row["reasoning"] is None for row in rows)
    assert manifest_of(plain)["missing_reasoning"] == 4 and "4 without reasoning" in result.stderr


def test_backoff_turns_real_429s_into_samples_and_the_manifest_counts_them(teacher: Stack, tmp_path: Path) -> None:
    retry_after = drain_bucket(teacher, KEYS["burst"])
    assert retry_after is not None and int(retry_after) >= 1
    out = tmp_path / "out"
    topics = write_topics(tmp_path, TOPICS[:1])
    result = run_cli(
        "--mode", "response", "--out", str(out), "--topics", str(topics), "--questions-per-topic", "3",
        "--concurrency", "3", "--max-retries", "20", *teacher_args(teacher, "--teacher-extra-body", NOT_EMPTY),
        key=KEYS["burst"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "teacher: 429; retrying" in result.stderr
    manifest = manifest_of(out)
    assert (manifest["done"], manifest["failed"]) == (3, 0)
    assert manifest["usage"]["retries_by_reason"].get("429", 0) >= 1
    assert manifest["usage"]["retries"] == sum(manifest["usage"]["retries_by_reason"].values())
    assert manifest["usage"]["requests"] == manifest["usage"]["replies"] + manifest["usage"]["retries"] + 1  # + /models


def test_teacher_client_backs_off_real_429s(teacher: Stack) -> None:
    drain_bucket(teacher, KEYS["client"])
    config = TeacherConfig(
        url=f"{teacher.url}/v1", model="student", api_key=KEYS["client"], retry=RetryPolicy(20, 0.2, 5.0)
    )

    async def three_at_once() -> tuple[list[ChatReply], TeacherClient]:
        async with TeacherClient(config) as client:
            replies = await asyncio.gather(
                *(
                    client.chat([{"role": "user", "content": f"Câu hỏi {i}"}], max_tokens=4, temperature=0.0)
                    for i in range(3)
                )
            )
        return list(replies), client

    replies, client = asyncio.run(three_at_once())
    assert len(replies) == 3 and all(reply.completion_tokens > 0 for reply in replies)
    assert client.usage.retries_by_reason["429"] >= 1 and client.usage.replies == 3
    assert max(reply.attempts for reply in replies) >= 2


def test_a_run_killed_halfway_resumes_to_exactly_the_plan(teacher: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    topics = write_topics(tmp_path, TOPICS)
    planned = 3 * 4
    args = [
        "--mode", "response", "--out", str(out), "--topics", str(topics), "--questions-per-topic", "4",
        "--concurrency", "2", *teacher_args(teacher, "--teacher-extra-body", NOT_EMPTY),
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("STUDENT_TEACHER")},
        "STUDENT_TEACHER_API_KEY": KEYS["kill"],
    }
    slow = [*args, "--rpm", "120"]  # the last --rpm wins: two requests a second, so it is caught halfway
    log = (tmp_path / "first-run.log").open("w")
    process = subprocess.Popen(
        [STUDENT, "distill", *slow], stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
    )
    samples = out / "samples.jsonl"

    def lines() -> int:
        return samples.read_bytes().count(b"\n") if samples.exists() else 0

    try:
        assert wait_for(lambda: lines() >= 3 or process.poll() is not None, timeout_s=240, interval_s=0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(30)
        log.close()
    written = lines()
    assert 3 <= written < planned, (tmp_path / "first-run.log").read_text()
    questions_before = questions_of(out)
    assert len(questions_before) == planned  # all questions are asked before the first answer
    assert manifest_of(out)["status"] == "running"  # it never got to say otherwise
    with samples.open("ab") as handle:  # as if the kill had landed in the middle of a write
        handle.write(b'{"id": "response/ma-giam-gia/0003", "task": "resp')

    result = run_cli(*args, key=KEYS["kill"])
    assert result.returncode == 0, result.stderr
    assert "torn last line" in result.stderr
    rows = rows_of(out)
    ids = [row["id"] for row in rows]
    plan = plan_questions("response", TOPICS, 4)
    assert len(ids) == len(set(ids)) == planned and set(ids) == {sample.id for sample in plan.samples}
    assert len(load_chat_jsonl(samples)) == planned
    assert questions_of(out) == questions_before  # the resumed run answered the same questions
    by_slot = {(row["topic_key"], row["index"]): row["question"] for row in questions_before}
    for row in rows:
        _, topic_key, index = row["id"].split("/")
        assert row["messages"][1]["content"] == by_slot[(topic_key, int(index))]
    manifest = manifest_of(out)
    assert (manifest["status"], manifest["planned"], manifest["done"], manifest["missing"]) == (
        "complete",
        planned,
        planned,
        0,
    )
    assert [run["status"] for run in manifest["runs"]] == ["interrupted", "complete"]
    assert manifest["runs"][-1]["samples_written"] == planned - written


def test_resume_refuses_another_plan_and_force_starts_over(teacher: Stack, tmp_path: Path) -> None:
    out = tmp_path / "out"
    topics = write_topics(tmp_path, TOPICS[:1])
    base = ["--mode", "response", "--out", str(out), "--topics", str(topics)]
    extra = teacher_args(teacher, "--teacher-extra-body", NOT_EMPTY)
    assert run_cli(*base, "--questions-per-topic", "2", *extra, key=KEYS["force"]).returncode == 0
    before = (out / "samples.jsonl").read_bytes()

    result = run_cli(*base, "--questions-per-topic", "3", *extra, key=KEYS["force"])
    assert result.returncode == 1
    assert "different plan (inputs.questions_per_topic, samples differ)" in result.stderr and "--force" in result.stderr
    result = run_cli(*base, "--mode", "cot", "--questions-per-topic", "2", *extra, key=KEYS["force"])
    assert result.returncode == 1 and "mode" in result.stderr
    result = run_cli(*base, "--questions-per-topic", "2", *extra, "--teacher-model", "other", key=KEYS["force"])
    assert result.returncode == 1 and "teacher.model" in result.stderr
    assert (out / "samples.jsonl").read_bytes() == before

    result = run_cli(*base, "--questions-per-topic", "3", "--force", *extra, key=KEYS["force"])
    assert result.returncode == 0, result.stderr
    assert len(rows_of(out)) == 3 and len(manifest_of(out)["runs"]) == 1


def test_a_refused_key_or_an_unknown_model_stops_with_a_clear_error(teacher: Stack, tmp_path: Path) -> None:
    topics = write_topics(tmp_path, TOPICS[:1])
    base = ["--mode", "response", "--topics", str(topics), "--questions-per-topic", "1", *teacher_args(teacher)]
    wrong = "sk-wrong-0123456789abcdef"
    result = run_cli(*base, "--out", str(tmp_path / "a"), key=wrong)
    assert result.returncode == 1
    assert "HTTP 401" in result.stderr and "check the key in $STUDENT_TEACHER_API_KEY" in result.stderr
    assert wrong not in result.stderr + result.stdout
    result = run_cli(*base, "--out", str(tmp_path / "c"), "--teacher-key-env", "NO_SUCH_VARIABLE", key=KEYS["model"])
    assert result.returncode == 1 and "no key was sent: set $NO_SUCH_VARIABLE" in result.stderr
    result = run_cli(*base, "--out", str(tmp_path / "b"), "--teacher-model", "nope", key=KEYS["model"])
    assert result.returncode == 1 and "does not serve model 'nope'" in result.stderr
    assert not (tmp_path / "b" / "samples.jsonl").exists()
    assert http_get(f"{teacher.url}/health")[0] == 200
