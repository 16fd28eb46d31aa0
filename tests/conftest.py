"""Session-wide real parts: a tiny locally built model and one running stack (vLLM + gateway).

End-to-end tests are marked `e2e` automatically, from the fixtures they use (`E2E_FIXTURES`): a
real model, vLLM, a gateway process, a browser or Prometheus. Tests that train a model, run a
`student` command on one, or start a gateway process of their own carry `@pytest.mark.e2e`
themselves. `pytest -m "not e2e"` runs the unit tests alone, in under a minute.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import VLLM_READY_TIMEOUT_S, Stack, running_stack

TOKENIZER_TEXTS = [
    "Xin chào, tôi muốn hỏi về đơn hàng của tôi.",
    "Chính sách đổi trả trong vòng 30 ngày, sản phẩm còn nguyên seal.",
    "Cửa hàng hỗ trợ thanh toán khi nhận hàng, chuyển khoản và ví điện tử.",
    "Mã giảm giá áp dụng cho đơn từ 500.000đ. Bảo hành 12 tháng.",
    "Hello, where is my order? The quick brown fox jumps over the lazy dog.",
]
# Small enough to start fast; max_num_seqs=2 lets a test fill every slot and queue a third request.
# A 4096-token context lets a "long" request run for seconds even on an idle machine.
# --enforce-eager: vLLM skips torch.compile, which took 17 s of each tiny model's 43 s start-up on
# 2 cores; the tests are about the gateway, not vLLM's kernels (one SIGTERM test in
# tests/server/runtime/test_vllm_supervisor.py starts vLLM with its defaults).
STACK_ARGS = [
    "--max-model-len", "4096", "--kv-cache-gib", "1", "--max-num-seqs", "2", "--dtype", "float32",
    "--vllm-arg=--enforce-eager",
]  # fmt: skip
SESSION_STACK_ARGS = [*STACK_ARGS, "--access-log"]
# For tests that need a request still running when they act (disconnect, crash): a 16,384-token
# answer takes several seconds however fast the box (4,096 took under 2 s on some).
LONG_CONTEXT_TOKENS = 16384
LONG_STACK_ARGS = ["--max-model-len", str(LONG_CONTEXT_TOKENS), *STACK_ARGS[2:]]
# A test using one of these (directly or through another fixture) runs real processes or a real
# model. Module fixtures that start a gateway on a stand-in upstream are listed too.
E2E_FIXTURES = frozenset(
    {
        "tiny_model_dir",
        "long_context_model_dir",
        "smollm2_base",
        "demo_build",
        "stack",
        "gateway_to_broken_upstream",
        "orphan_gateway",
        "page",
        "cpu_run",
        "trained",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight Llama (head_dim 64) with a locally trained tokenizer: seconds to build."""
    from models.tiny import build_random_llama

    return build_random_llama(_tokenizer(), tmp_path_factory.mktemp("tiny-model"), seed=0, max_position_embeddings=4096)


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny Llama with a 16,384-token context (serve it with LONG_STACK_ARGS)."""
    from models.tiny import build_random_llama

    directory = tmp_path_factory.mktemp("tiny-long-model")
    return build_random_llama(_tokenizer(), directory, seed=0, max_position_embeddings=LONG_CONTEXT_TOKENS)


def _tokenizer():
    from models.tokenizer import train_tokenizer

    return train_tokenizer(TOKENIZER_TEXTS * 20, vocab_size=400)


@pytest.fixture(scope="session")
def demo_build(smollm2_base: Path) -> tuple[Path, list[str]]:
    """The real demo student (the converted base + the committed shop LoRA, merged), built once per
    session in the base's cache (about 40 s). Returns its directory and the build's messages."""
    from models.demo import ensure_demo_student

    messages: list[str] = []
    return ensure_demo_student(smollm2_base.parent, messages.append), messages


@pytest.fixture(scope="session")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """`student serve` on the tiny model: the real vLLM child and the real gateway over HTTP."""
    log_path = tmp_path_factory.mktemp("stack") / "serve.log"
    with running_stack(
        ["--model", str(tiny_model_dir), *SESSION_STACK_ARGS], log_path, ready_timeout_s=VLLM_READY_TIMEOUT_S
    ) as running:
        yield running


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real pretrained base (SmolLM2-135M-Instruct from the pinned wheel), converted once per
    session into a fresh cache (about 25 s)."""
    from models.base_model import ensure_base_model

    return ensure_base_model(tmp_path_factory.mktemp("base-cache"), lambda _: None)
