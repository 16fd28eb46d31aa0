"""The article's whole loop on tiny sizes, every step the real `student` command in a subprocess:

teacher (the session stack: `student serve` on the tiny random model) → `student distill --mode cot`
→ `student dataset check --split-out` → `student train-lora` → `student merge` → `student serve
--model MERGED` → one chat through its gateway, found again in `/stats` and the ledger.

The student's base is the teacher's own tiny model (it has a chat template and a 4096-token
context, so the merged student starts with the session stack's arguments). The teacher is made
to write `<think>…</think>` replies with vLLM's structured outputs, as in tests/models/distill/test_command.py.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from models.dataset_check import TRAIN_FILE, VALIDATION_FILE
from models.distill.plan import SYSTEM_PROMPT
from models.merge import MANIFEST_NAME
from models.train_lora import TRAINING_RECORD
from server.accounting.ledger import read_requests
from tests.conftest import STACK_ARGS
from tests.models.distill.test_command import (
    THINK_REGEX,
    TOPICS,
    manifest_of,
    rows_of,
    run_cli,
    teacher_args,
    write_topics,
)
from tests.support import STUDENT, Stack, http_get, post_json, running_stack, wait_for

QUESTIONS_PER_TOPIC = 2
SAMPLES = len(TOPICS) * QUESTIONS_PER_TOPIC


def student(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    """`student ARGS` as a user runs it; asserts it succeeded."""
    result = subprocess.run(
        [STUDENT, *args], capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"student {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result


def test_teacher_to_served_student(stack: Stack, tiny_model_dir: Path, tmp_path: Path) -> None:
    # 1. distill: cot samples from the teacher, reasoning kept apart from the answer.
    distilled = tmp_path / "distilled"
    result = run_cli(
        "--mode", "cot", "--out", str(distilled), "--topics", str(write_topics(tmp_path, TOPICS)),
        "--questions-per-topic", str(QUESTIONS_PER_TOPIC), "--concurrency", "2",
        *teacher_args(stack, "--max-tokens", "96", "--teacher-extra-body", THINK_REGEX),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = manifest_of(distilled)
    assert (manifest["status"], manifest["planned"], manifest["done"], manifest["failed"]) == (
        "complete", SAMPLES, SAMPLES, 0,
    )  # fmt: skip
    assert manifest["counts_by_task"] == {"cot": SAMPLES} and manifest["missing_reasoning"] == 0
    assert manifest["usage"]["completion_tokens"] > 0
    assert len(rows_of(distilled)) == SAMPLES

    # 2. dataset check: passes (small sets allowed) and splits by question.
    split = tmp_path / "split"
    result = student(
        "dataset", "check", str(distilled / "samples.jsonl"), "--allow-small", "--split-out", str(split), "--json"
    )
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["problems"] == [] and report["samples"] == SAMPLES
    assert report["tasks"] == {"cot": {"samples": SAMPLES, "minimum": 1000, "below_minimum": True}}
    assert report["cot_missing_reasoning"] == [] and report["exact_duplicates"] == [] and report["near_empty"] == []
    train, validation = report["split"]["train"], report["split"]["validation"]
    assert train + validation == SAMPLES and train >= 1 and validation >= 1
    train_file, validation_file = split / TRAIN_FILE, split / VALIDATION_FILE
    assert len(train_file.read_text(encoding="utf-8").splitlines()) == train

    # 3. train-lora on the train split, validated on the other.
    adapter = tmp_path / "adapter"
    result = student(
        "train-lora", "--base", str(tiny_model_dir), "--data", str(train_file), "--validation", str(validation_file),
        "--out", str(adapter), "--steps", "4", "--batch-size", "4", "--max-length", "256", "--r", "4",
        "--alpha", "8", "--lr", "3e-3", "--device", "cpu",
    )  # fmt: skip
    assert result.stdout.strip() == str(adapter.resolve())
    record = json.loads((adapter / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert (record["data"]["samples"], record["validation"]["samples"]) == (train, validation)
    assert record["reasoning"]["inlined_samples"] == 0  # distill already wrote <think> into the answers
    assert record["train"]["steps"] == 4 and all(math.isfinite(loss) for loss in record["train"]["losses"])
    loss = record["validation_loss"]
    assert math.isfinite(loss["before"]) and math.isfinite(loss["after"]) and loss["after"] != loss["before"]

    # 4. merge, verified against base + adapter.
    merged = tmp_path / "merged"
    result = student("merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(merged))
    assert result.stdout.strip() == str(merged.resolve())
    verification = json.loads((merged / MANIFEST_NAME).read_text(encoding="utf-8"))["verification"]
    assert verification["passed"] is True and verification["adapter_effect_max_abs_diff"] > 0

    # 5. serve the merged student and chat with it through the gateway.
    with running_stack(["--model", str(merged), *STACK_ARGS], tmp_path / "serve.log", ready_timeout_s=420) as served:
        _, models = http_get(f"{served.url}/v1/models")
        assert [(model["id"], model["root"]) for model in json.loads(models)["data"]] == [("student", str(merged))]
        question = json.loads(validation_file.read_text(encoding="utf-8").splitlines()[0])["messages"][1]["content"]
        status, body = post_json(
            f"{served.url}/v1/chat/completions",
            {
                "model": "student",
                "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
                "max_tokens": 16,
                "min_tokens": 4,
                "temperature": 0,
            },
        )
        assert status == 200, body
        # Greedy, this student may answer only the newlines it saw most (around <think>): still an answer.
        content = body["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content
        usage = body["usage"]
        assert usage["prompt_tokens"] > 0 and 4 <= usage["completion_tokens"] <= 16

        def recorded() -> bool:
            return json.loads(http_get(f"{served.url}/stats")[1])["requests"]["total"] >= 1

        assert wait_for(recorded, timeout_s=10)
        stats = json.loads(http_get(f"{served.url}/stats")[1])
        assert (stats["requests"]["total"], stats["requests"]["ok"]) == (1, 1)
        assert stats["tokens"] == {"prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"]}
        assert wait_for(lambda: served.ledger_path.exists() and len(read_requests(served.ledger_path)) == 1, 10)
        (row,) = read_requests(served.ledger_path)
        assert (row.route, row.status, row.model) == ("/v1/chat/completions", 200, "student")
        assert (row.prompt_tokens, row.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
