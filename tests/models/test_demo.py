"""The demo student builder: cache key, determinism, atomic cache, CLI, and the real default build."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models import demo
from models.demo import BUILD_INFO_NAME, DATASET_FILE, PROMPTS_FILE, DemoSettings, ensure_demo_student
from models.merge import MANIFEST_NAME
from models.train import load_chat_jsonl
from tests.models.helpers import VIETNAMESE_LETTERS, sha256_of

QUICK = replace(DemoSettings(), base_steps=2, lora_steps=2, max_new_tokens=4, log_every=1)
WEIGHT_FILES = (
    "model.safetensors",
    "build/base/model.safetensors",
    "build/adapter/adapter_model.safetensors",
)
TOPIC_WORDS = {
    "order_tracking": "đơn hàng",
    "return_policy": "đổi trả",
    "payment_methods": "thanh toán",
    "discount_code": "mã",
    "warranty": "bảo hành",
    "late_delivery": "trễ",
    "size_exchange": "size",
}


class Recorder:
    """A progress callback that keeps the messages, to tell a build from a cache hit."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, message: str) -> None:
        self.messages.append(message)

    def built(self) -> bool:
        return any(message.startswith("building the demo student") for message in self.messages)


def words(text: str) -> list[str]:
    """Lower-cased runs of letters (Vietnamese included); digits and punctuation dropped."""
    return re.findall(r"[^\W\d_]+", text.lower())


def test_cache_key_hashes_the_settings() -> None:
    assert demo.cache_key(QUICK) == demo.cache_key(replace(QUICK))
    assert demo.cache_key(QUICK) != demo.cache_key(DemoSettings())
    assert demo.cache_key(QUICK) != demo.cache_key(replace(QUICK, seed=1))
    assert re.fullmatch(r"demo-student-[0-9a-f]{12}", demo.cache_dir_name(QUICK))


def test_default_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    assert demo.default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(demo.CACHE_ENV)
    assert demo.default_cache_dir() == Path.home() / ".cache" / "student-serve"


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_student(tmp_path_factory.mktemp("cache-a"), lambda _: None, QUICK)


def test_builds_are_bit_identical_and_a_half_written_dir_is_never_trusted(quick_build: Path, tmp_path: Path) -> None:
    leftover = tmp_path / demo.cache_dir_name(QUICK)
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    recorder = Recorder()
    threads_before = torch.get_num_threads()

    rebuilt = ensure_demo_student(tmp_path, recorder, QUICK)

    assert rebuilt == leftover.resolve() and recorder.built()
    assert torch.get_num_threads() == threads_before
    for name in WEIGHT_FILES:
        assert sha256_of(rebuilt / name) == sha256_of(quick_build / name), name
    assert [path.name for path in tmp_path.iterdir()] == [leftover.name], "no staging directory may be left"


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    too_short = replace(QUICK, max_length=8)  # the LoRA phase then finds no assistant token

    with pytest.raises(demo.DemoError, match="building the demo student failed: none of the 490 samples"):
        ensure_demo_student(tmp_path, lambda _: None, too_short)

    assert list(tmp_path.iterdir()) == []


def test_build_layout_and_records(quick_build: Path) -> None:
    info = json.loads((quick_build / BUILD_INFO_NAME).read_text(encoding="utf-8"))
    manifest = json.loads((quick_build / MANIFEST_NAME).read_text(encoding="utf-8"))

    assert info["cache_key"] == demo.cache_key(QUICK)
    assert info["settings"]["base_steps"] == 2
    assert len(info["answers"]) == len(load_chat_jsonl(PROMPTS_FILE))
    assert manifest["verification"]["passed"] is True
    assert manifest["base"]["path"] == str(quick_build / "build" / "base")
    assert manifest["adapter"]["path"] == str(quick_build / "build" / "adapter")
    assert manifest["adapter"]["r"] == QUICK.lora_r
    assert manifest["weights"]["model.safetensors"]["sha256"] == sha256_of(quick_build / "model.safetensors")
    assert json.loads((quick_build / "config.json").read_text())["head_dim"] == 64


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="student demo-model")
    demo.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_uses_the_cache_dir_from_the_environment(
    quick_build: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(demo.CACHE_ENV, str(quick_build.parent))

    assert demo.run(parse([]), QUICK) == 0

    captured = capsys.readouterr()
    assert captured.out.strip() == str(quick_build)
    assert "cache hit" in captured.err


def test_cli_out_dir_refuses_foreign_content_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("not a model")

    assert demo.run(parse(["--out", str(out_dir)]), QUICK) == 1
    captured = capsys.readouterr()
    assert "student demo-model: error:" in captured.err and "pass --force" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert (out_dir / "notes.txt").exists()

    assert demo.run(parse(["--out", str(out_dir), "--force"]), QUICK) == 0
    assert capsys.readouterr().out.strip() == str(out_dir.resolve())
    assert not (out_dir / "notes.txt").exists() and (out_dir / BUILD_INFO_NAME).is_file()

    assert demo.run(parse(["--out", str(out_dir)]), QUICK) == 0
    assert "cache hit" in capsys.readouterr().err


@pytest.fixture(scope="module")
def full_build(demo_build: tuple[Path, list[str]]) -> tuple[Path, Recorder]:
    """The real default demo student (the session's shared build) and its build messages."""
    model_dir, messages = demo_build
    recorder = Recorder()
    recorder.messages = messages
    return model_dir, recorder


def greedy_replies(model_dir: Path) -> list[tuple[str, str | None, str]]:
    """(question, topic, reply) for each bundled prompt, by plain transformers greedy decoding."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    replies = []
    for prompt in load_chat_jsonl(PROMPTS_FILE):
        input_ids = tokenizer.apply_chat_template(
            prompt.as_dicts(), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids, max_new_tokens=120, do_sample=False)
        reply = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
        replies.append((prompt.messages[-1].content, prompt.topic, reply))
    return replies


def test_default_demo_student_answers_in_readable_vietnamese(full_build: tuple[Path, Recorder]) -> None:
    model_dir, recorder = full_build
    assistant_vocabulary = {word for chat in load_chat_jsonl(DATASET_FILE) for word in words(chat.messages[-1].content)}

    replies = greedy_replies(model_dir)

    for _question, _topic, reply in replies:
        reply_words = words(reply)
        known = [word for word in reply_words if word in assistant_vocabulary]
        assert "\ufffd" not in reply, reply
        assert len(reply_words) >= 8, reply
        assert len(known) >= 0.9 * len(reply_words), reply
        assert VIETNAMESE_LETTERS & set(reply.lower()), reply
        assert f"A: {reply.strip()}" in recorder.messages, "the build prints the same answers"
    on_topic = [TOPIC_WORDS[topic] in reply.lower() for _, topic, reply in replies]
    assert sum(on_topic) >= len(replies) - 2, replies
    assert len({reply for _, _, reply in replies}) >= len(replies) - 2, "answers must depend on the question"


def test_default_demo_student_is_a_cache_hit_the_second_time(full_build: tuple[Path, Recorder]) -> None:
    model_dir, first = full_build
    info_before = (model_dir / BUILD_INFO_NAME).read_text(encoding="utf-8")
    second = Recorder()

    assert ensure_demo_student(model_dir.parent, second) == model_dir

    assert first.built() and not second.built()
    assert second.messages == [f"cache hit: {model_dir} is up to date (key {demo.cache_key()[:12]})"]
    assert (model_dir / BUILD_INFO_NAME).read_text(encoding="utf-8") == info_before
    manifest = json.loads((model_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["adapter_effect_max_abs_diff"] > 1.0
