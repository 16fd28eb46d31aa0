"""The real demo student, through the real gateway: it knows the shop, and beats its base.

`student serve` with no --model serves the demo student (SmolLM2-135M-Instruct with the shop's
LoRA merged in); a second `student serve` serves the base alone. `student eval` answers the same
held-out questions with both. The tests share the two stacks; the last one stops the demo stack
with Ctrl-C, as a user would.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import STUDENT, Stack, http_get, post_json, running_stack, start_stack, wait_for

SYSTEM = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."
# --enforce-eager: torch.compile took 55 of the demo vLLM's 96 s start-up here, and its cache is keyed
# on the model's path, a fresh one each session. The SIGTERM test in tests/server/runtime/ starts a
# vLLM with torch.compile (vLLM's default) and stops it.
SERVE_ARGS = ["--kv-cache-gib", "1", "--max-model-len", "2048", "--vllm-arg=--enforce-eager"]
EVAL_ITEMS = 39  # three per topic: `--limit` takes the topics round-robin; they require 46 facts
# Measured on this 2-core VM with the committed adapter (2026-12-03), in two runs at concurrency 8:
# the student stated 13 of the 46 facts both times (37 of 39 answers identical), the base none, a
# margin of 0.283; again 13 with --enforce-eager (2026-12-04). Asserted: that margin less 3 facts,
# for answers that change with the batching. The goal, a margin of 0.30 on the whole eval set, is
# not met (docs/making-a-student.md).
MIN_RECALL_MARGIN = (13 - 3) / 46
MIN_VIETNAMESE = 0.90


@pytest.fixture(scope="module")
def demo_stack(demo_build: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`student serve` without a model: the cached demo student."""
    model_dir, _ = demo_build
    log_path = tmp_path_factory.mktemp("demo-stack") / "serve.log"
    stack = start_stack(SERVE_ARGS, log_path, env={"STUDENT_CACHE_DIR": str(model_dir.parent)})
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.kill_all()


@pytest.fixture(scope="module")
def base_stack(smollm2_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_path = tmp_path_factory.mktemp("base-stack") / "serve.log"
    args = ["--model", str(smollm2_base), *SERVE_ARGS]
    with running_stack(args, log_path, ready_timeout_s=420) as stack:
        yield stack


def ask(stack: Stack, question: str) -> str:
    status, answer = post_json(
        f"{stack.url}/v1/chat/completions",
        {
            "model": "student",
            "temperature": 0,
            "max_tokens": 120,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        },
    )
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def test_the_demo_student_is_served_from_the_cache_and_the_gateway_stays_light(
    demo_stack: Stack, demo_build: tuple[Path, list[str]]
) -> None:
    model_dir, _ = demo_build
    assert "cache hit" in demo_stack.log()
    status, body = http_get(f"{demo_stack.url}/v1/models")
    assert status == 200 and json.loads(body)["data"][0]["root"] == str(model_dir)
    gateway_libraries = {Path(region.path).name for region in psutil.Process(demo_stack.process.pid).memory_maps()}
    assert not any(name.startswith("libtorch") for name in gateway_libraries), "the gateway loaded torch"


def test_the_demo_student_states_the_shops_policies_in_vietnamese(demo_stack: Stack) -> None:
    warranty = ask(demo_stack, "Chính sách bảo hành của shop thế nào?")
    assert "12 tháng" in warranty and "\ufffd" not in warranty, warranty
    shipping = ask(demo_stack, "Phí ship của shop là bao nhiêu vậy?")
    assert "30.000đ" in shipping or "500.000đ" in shipping, shipping


def test_the_student_states_more_of_the_facts_than_its_base(
    demo_stack: Stack, base_stack: Stack, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    done = subprocess.run(
        [
            STUDENT, "eval",
            "--target", f"student={demo_stack.url}",
            "--target", f"base={base_stack.url}",
            "--limit", str(EVAL_ITEMS),
            "--concurrency", "8",
            "--out", str(out),
            "--min-vietnamese", str(MIN_VIETNAMESE),
        ],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    by_label = {target["label"]: target for target in report["targets"]}
    student, base = by_label["student"], by_label["base"]
    margin = student["fact_recall"] - base["fact_recall"]
    print(
        f"fact recall on {EVAL_ITEMS} held-out items: student {student['fact_recall']:.3f}, "
        f"base {base['fact_recall']:.3f}, margin {margin:+.3f}; "
        f"Vietnamese: student {student['vietnamese_share']:.3f}, base {base['vietnamese_share']:.3f}"
    )
    assert margin >= MIN_RECALL_MARGIN, (student["fact_recall"], base["fact_recall"])
    assert student["vietnamese_share"] >= MIN_VIETNAMESE


def test_ctrl_c_stops_the_demo_stack_with_130_and_leaves_no_vllm(demo_stack: Stack) -> None:
    """Last in the module: it ends the shared demo stack."""
    assert demo_stack.stop(signal.SIGINT) == 130
    assert wait_for(lambda: not demo_stack.alive_descendants(), 10), demo_stack.alive_descendants()
