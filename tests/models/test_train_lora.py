"""`student train-lora` on a tiny random Llama: it learns, records, merges, and refuses bad input clearly."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from models import train_lora
from models.chat_data import ChatSample, Message, load_chat_jsonl
from models.demo import DATASET_FILE
from models.distill.command import sample_row
from models.distill.plan import PlannedSample
from models.distill.teacher import ChatReply
from models.merge import load_meta_base, merge_adapter
from models.train import TrainConfig, collate, encode_samples, evaluate_loss
from models.train_lora import LORA_TARGETS, TRAINING_RECORD, LoraSettings, TrainLoraResult
from server.runtime import cli
from tests.models.helpers import chat_ids, logits_of

CUDA = torch.cuda.is_available()
STEPS = 16
SYSTEM = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."


def quiet(_: str) -> None:
    """Progress sink."""


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 32 chats of the bundled dataset."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    lines = DATASET_FILE.read_text(encoding="utf-8").splitlines()[:32]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, chats: Path) -> TrainLoraResult:
    """A rank-8 adapter trained for 16 steps on `chats`, validated on the same chats (CPU, float32)."""
    config = TrainConfig(steps=STEPS, learning_rate=3e-3, batch_size=8, max_length=256, warmup_steps=2, log_every=4)
    return train_lora.train_lora(
        tiny_base,
        chats,
        tmp_path_factory.mktemp("lora") / "adapter",
        config,
        LoraSettings(r=8, alpha=16),
        validation_path=chats,
        device="cpu",
        progress=quiet,
    )


def test_training_lowers_the_validation_loss_and_records_the_run(trained: TrainLoraResult, chats: Path) -> None:
    record = json.loads((trained.out_dir / TRAINING_RECORD).read_text(encoding="utf-8"))

    assert record == json.loads(json.dumps(trained.record))
    assert record["format"] == "student-train-lora/1"
    loss = record["validation_loss"]
    assert loss["after"] < loss["before"] - 0.1, loss
    assert len(record["train"]["losses"]) == record["train"]["steps"] == STEPS
    assert record["train"]["losses"][0] == record["train"]["first_loss"]
    assert record["data"]["samples"] == record["validation"]["samples"] == 32
    assert record["data"]["path"] == str(chats.resolve())
    assert (record["device"], record["dtype"]) == ("cpu", "float32")
    assert record["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(LORA_TARGETS)}
    assert record["config"]["learning_rate"] == 3e-3 and record["config"]["loss_on"] == "assistant"
    assert 0 < record["parameters"]["trainable"] < record["parameters"]["total"]
    assert record["elapsed_s"] >= 0


def test_the_adapter_holds_only_lora_weights_and_the_base_tokenizer(trained: TrainLoraResult, tiny_base: Path) -> None:
    names = {path.name for path in trained.out_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", TRAINING_RECORD} <= names
    weights = load_file(str(trained.out_dir / "adapter_model.safetensors"))
    assert weights and all("lora_A" in name or "lora_B" in name for name in weights)
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in weights.items())
    config = json.loads((trained.out_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base.resolve())
    assert not list(trained.out_dir.parent.glob(".adapter.tmp-*")), "the staging directory is gone"


def test_the_adapter_merges_and_the_merged_model_differs_from_the_base(
    trained: TrainLoraResult, tiny_base: Path, small_tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    result = merge_adapter(tiny_base, trained.out_dir, tmp_path / "merged", progress=quiet)

    assert result.verification.passed
    ids = chat_ids(small_tokenizer, "Shop có nhận thanh toán bằng ví MoMo không?")
    merged = logits_of(AutoModelForCausalLM.from_pretrained(str(result.out_dir)), ids)
    base = logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_base)), ids)
    assert (merged - base).abs().max() > 0.1


def test_evaluate_loss_is_the_mean_over_assistant_tokens(
    tiny_base: Path, small_tokenizer: PreTrainedTokenizerFast
) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    samples = load_chat_jsonl(DATASET_FILE)[:6]
    encoded = encode_samples(small_tokenizer, samples, 256, "assistant")
    with torch.inference_mode():
        expected = float(model(**collate(encoded, small_tokenizer.pad_token_id)).loss)

    # One batch or three: every assistant token weighs the same, and the mode is restored.
    model.train()
    for batch_size in (6, 2):
        loss = evaluate_loss(model, small_tokenizer, samples, 256, batch_size)
        assert loss == pytest.approx(expected, rel=1e-5)
    assert model.training


@pytest.mark.e2e
def test_bfloat16_base_trains_float32_lora_weights_that_merge(tiny_base: Path, chats: Path, tmp_path: Path) -> None:
    """The GPU's default dtype, run on the CPU: only device placement differs on a GPU."""
    config = TrainConfig(steps=2, learning_rate=3e-3, batch_size=4, max_length=128, warmup_steps=0)
    lora = LoraSettings(r=4, alpha=8)
    result = train_lora.train_lora(
        tiny_base, chats, tmp_path / "adapter", config, lora, device="cpu", dtype="bfloat16", progress=quiet
    )

    assert result.record["dtype"] == "bfloat16" and result.record["validation_loss"] is None
    weights = load_file(str(result.out_dir / "adapter_model.safetensors"))
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert merge_adapter(tiny_base, result.out_dir, tmp_path / "merged", progress=quiet).verification.passed


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_auto_device_trains_on_the_gpu_in_bfloat16(tiny_base: Path, chats: Path, tmp_path: Path) -> None:
    config = TrainConfig(steps=4, learning_rate=3e-3, batch_size=8, max_length=256, warmup_steps=0)
    result = train_lora.train_lora(
        tiny_base, chats, tmp_path / "adapter", config, validation_path=chats, progress=quiet
    )

    assert (result.record["device"], result.record["dtype"]) == ("cuda", "bfloat16")
    assert result.record["validation_loss"]["after"] < result.record["validation_loss"]["before"]
    assert merge_adapter(tiny_base, result.out_dir, tmp_path / "merged", progress=quiet).verification.passed


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["train-lora", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.e2e
def test_cli_trains_prints_the_adapter_and_needs_force_to_replace_it(
    tiny_base: Path, chats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "adapter"
    argv = ["--base", str(tiny_base), "--data", str(chats), "--out", str(out_dir), "--device", "cpu"]
    argv += ["--steps", "2", "--batch-size", "4", "--max-length", "128", "--r", "4", "--alpha", "8"]

    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert out.strip() == str(out_dir.resolve())
    assert "[train-lora] LoRA training step 2/2 loss " in err
    assert f"next: student merge --base {tiny_base.resolve()} --adapter {out_dir.resolve()}" in err
    record = json.loads((out_dir / TRAINING_RECORD).read_text())
    assert record["config"]["steps"] == 2 and record["config"]["warmup_steps"] == 0
    assert record["lora"]["r"] == 4 and record["validation"] is None

    code, out, err = run_cli(argv, capsys)
    assert code == 1 and "already exists and is not empty; pass --force to replace it" in err

    assert run_cli([*argv, "--force", "--seed", "3"], capsys)[0] == 0
    assert json.loads((out_dir / TRAINING_RECORD).read_text())["config"]["seed"] == 3


def _without_chat_template(base: Path, out_dir: Path) -> Path:
    shutil.copytree(base, out_dir)
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    return out_dir


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing base", "the base directory {tmp}/absent does not exist"),
        ("no chat template", "has no chat template, so chats cannot be rendered for training; add "),
        ("empty data", "dataset file {tmp}/empty.jsonl has no samples"),
        ("missing data", "dataset file {tmp}/absent.jsonl does not exist"),
        ("malformed data", "bad.jsonl line 2: message 0 has role 'bot'"),
        ("output exists", "--out {tmp}/out already exists and is not empty; pass --force"),
        ("absent targets", "none of the target modules c_attn is a linear layer of the base"),
        ("too short", "none of the 32 samples has an assistant token within 8 tokens"),
    ],
)
def test_cli_bad_input_is_a_one_line_error_and_writes_nothing(
    case: str, message: str, tiny_base: Path, chats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, data, out_dir, extra = tiny_base, chats, tmp_path / "out", ["--steps", "1", "--device", "cpu"]
    if case == "missing base":
        base = tmp_path / "absent"
    elif case == "no chat template":
        base = _without_chat_template(tiny_base, tmp_path / "base")
    elif case == "empty data":
        data = tmp_path / "empty.jsonl"
        data.write_text("\n\n")
    elif case == "missing data":
        data = tmp_path / "absent.jsonl"
    elif case == "malformed data":
        data = tmp_path / "bad.jsonl"
        first = chats.read_text(encoding="utf-8").splitlines()[0]
        data.write_text(first + '\n{"messages": [{"role": "bot", "content": "Chào"}]}\n', encoding="utf-8")
    elif case == "output exists":
        out_dir.mkdir()
        (out_dir / "keep.txt").write_text("x")
    elif case == "absent targets":
        extra += ["--target-modules", "c_attn"]
    elif case == "too short":
        extra += ["--max-length", "8"]

    argv = ["--base", str(base), "--data", str(data), "--out", str(out_dir), *extra]
    code, out, err = run_cli(argv, capsys)

    assert code == 1
    errors = [line for line in err.splitlines() if not line.startswith("[train-lora] ")]
    assert len(errors) == 1 and errors[0].startswith("student train-lora: error: "), err
    assert message.format(tmp=tmp_path) in errors[0]
    assert "Traceback" not in err and out == ""
    if case == "output exists":
        assert [path.name for path in out_dir.iterdir()] == ["keep.txt"]
    else:
        assert not out_dir.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_refused(
    tiny_base: Path, chats: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base", str(tiny_base), "--data", str(chats), "--out", str(tmp_path / "out")]
    argv += ["--device", "cuda"]

    code, _, err = run_cli(argv, capsys)

    assert code == 1
    assert err.startswith("student train-lora: error: --device cuda was asked for, but CUDA is not available")
    assert not (tmp_path / "out").exists()
    assert train_lora.resolve_device("auto") == torch.device("cpu")


def cot_chat(answer: str) -> ChatSample:
    turns = (("system", SYSTEM), ("user", "Vì sao đơn bị hủy?"), ("assistant", answer))
    return ChatSample(tuple(Message(role, content) for role, content in turns))


def test_reasoning_field_goes_in_front_of_the_answer_unless_it_is_there(tmp_path: Path) -> None:
    path = tmp_path / "cot.jsonl"
    rows = [
        {"task": "cot", "reasoning": " Quá hạn thanh toán. ", **_messages("Đơn bị hủy vì quá hạn.")},
        {"task": "cot", "reasoning": "Bỏ qua.", **_messages("<think>Đã có.</think>\n\nĐơn bị hủy.")},
        {"task": "response", **_messages("Dạ, shop kiểm tra giúp bạn.")},
    ]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

    inline, inlined = train_lora.load_samples(path, "inline")
    dropped, dropped_count = train_lora.load_samples(path, "drop")

    assert inlined == 1 and dropped_count == 1  # drop cuts the <think> already in the second answer
    expected = "<think>\nQuá hạn thanh toán.\n</think>\n\nĐơn bị hủy vì quá hạn."
    assert inline[0].messages[-1].content == expected
    assert inline[2:] == dropped[2:] and dropped[0].messages[-1].content == "Đơn bị hủy vì quá hạn."
    assert inline[1].messages[-1].content == "<think>Đã có.</think>\n\nĐơn bị hủy."
    assert dropped[1].messages[-1].content == "Đơn bị hủy."


def _messages(answer: str) -> dict[str, object]:
    return {"messages": cot_chat(answer).as_dicts()}


def test_drop_trains_answers_only_on_cot_rows_as_distill_writes_them(
    tiny_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    replies = [
        ("<think>\nQuá hạn thanh toán.\n</think>\n\nĐơn bị hủy vì quá hạn.", None),  # <think> in content
        ("Đơn bị hủy do hết hàng.", "Kho báo hết."),  # the server's reasoning_content
        ("Dạ, shop kiểm tra giúp bạn.", None),  # no reasoning: kept, flagged
    ]
    prefix = cot_chat("").as_dicts()[:-1]
    rows = [
        sample_row(
            PlannedSample(f"cot/huy-don/{index:04d}", "cot", "hủy đơn", "huy-don", index),
            prefix,
            ChatReply(content, reasoning, "stop", 9, 9, 1),
        )
        for index, (content, reasoning) in enumerate(replies)
    ]
    assert [row["missing_reasoning"] for row in rows] == [False, False, True]
    reasoned = rows[1]["messages"][-1]["content"]
    assert reasoned == "<think>\nKho báo hết.\n</think>\n\nĐơn bị hủy do hết hàng."
    path = tmp_path / "cot.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows * 4), encoding="utf-8")

    dropped, changed = train_lora.load_samples(path, "drop")
    assert changed == 8
    assert [sample.messages[-1].content for sample in dropped[:3]] == [
        "Đơn bị hủy vì quá hạn.", "Đơn bị hủy do hết hàng.", "Dạ, shop kiểm tra giúp bạn.",
    ]  # fmt: skip
    assert [sample.messages[:-1] for sample in dropped[:3]] == [cot_chat("").messages[:-1]] * 3
    two_turns = ChatSample(
        (Message("user", "A?"), Message("assistant", "<think>x</think>Một."), Message("user", "B?"),
         Message("assistant", "Hai <think>\ny\n</think>\n\nba."))
    )  # fmt: skip
    stripped, was_changed = train_lora.without_reasoning(two_turns)
    assert was_changed and [m.content for m in stripped.messages] == ["A?", "Một.", "B?", "Hai ba."]
    assert train_lora.without_reasoning(cot_chat("Không suy luận.")) == (cot_chat("Không suy luận."), False)

    out_dir = tmp_path / "adapter"
    argv = ["--base", str(tiny_base), "--data", str(path), "--validation", str(path), "--out", str(out_dir)]
    argv += ["--reasoning", "drop", "--steps", "1", "--device", "cpu", "--max-length", "128"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "cut <think>…</think> out of the answers of 8 samples (--reasoning drop)" in err
    record = json.loads((out_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert record["reasoning"] == {"mode": "drop", "inlined_samples": 0, "dropped_samples": 8}


def test_a_template_that_cuts_the_reasoning_out_is_detected(small_tokenizer: PreTrainedTokenizerFast) -> None:
    samples = [cot_chat("Không suy luận."), cot_chat("<think>Quá hạn.</think>\n\nĐơn bị hủy.")]
    cutting = copy.deepcopy(small_tokenizer)
    cutting.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].split('</think>')[-1]"
        " + '<|im_end|>\\n' }}{% endfor %}"
    )

    assert not train_lora.template_drops_reasoning(small_tokenizer, samples)
    assert train_lora.template_drops_reasoning(cutting, samples)
    assert not train_lora.template_drops_reasoning(cutting, samples[:1])


def test_the_default_warm_up_is_a_tenth_of_the_steps_at_most_ten() -> None:
    assert [train_lora.default_warmup_steps(steps) for steps in (1, 9, 40, 1000)] == [0, 0, 4, 10]


def test_target_modules_match_like_peft_and_partly_absent_ones_warn(tiny_base: Path) -> None:
    model = load_meta_base(tiny_base)
    messages: list[str] = []

    train_lora.check_targets(model, ("self_attn.q_proj", "v_proj"), tiny_base, messages.append)
    assert messages == []
    train_lora.check_targets(model, ("q_proj", "c_attn"), tiny_base, messages.append)
    assert messages == ["warning: the base has no c_attn; LoRA wraps only q_proj"]
    with pytest.raises(train_lora.TrainLoraError, match="its linear layers are named down_proj, gate_proj, k_proj"):
        train_lora.check_targets(model, ("attn.q_proj",), tiny_base, messages.append)


class Stop(Exception):  # noqa: N818  stands for the process being stopped, not an error
    """Stands for the process being stopped right after a checkpoint was written."""


def _resumable(tiny_base: Path, chats: Path, out: Path, progress, lr: float = 3e-3) -> TrainLoraResult:
    config = TrainConfig(steps=12, learning_rate=lr, batch_size=4, max_length=256, warmup_steps=2, log_every=3)
    return train_lora.train_lora(
        tiny_base, chats, out, config, LoraSettings(r=8, alpha=16), device="cpu", progress=progress, checkpoint_every=3
    )


@pytest.mark.e2e
def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_adapter(
    tiny_base: Path, chats: Path, tmp_path: Path
) -> None:
    straight = _resumable(tiny_base, chats, tmp_path / "straight", quiet)

    def stop_after_step_6(message: str) -> None:
        if message.endswith("checkpoint saved at step 6"):
            raise Stop

    out = tmp_path / "resumed"
    with pytest.raises(Stop):
        _resumable(tiny_base, chats, out, stop_after_step_6)
    checkpoint = train_lora.checkpoint_path(out)
    assert checkpoint.is_file() and not out.exists()

    messages: list[str] = []
    resumed = _resumable(tiny_base, chats, out, messages.append)
    assert any("resuming at step 7/12" in message for message in messages), messages
    assert not checkpoint.exists()
    assert resumed.record["train"]["resumed_from_step"] == 6
    assert resumed.record["train"]["losses"] == straight.record["train"]["losses"]
    ours, theirs = (
        load_file(out / "adapter_model.safetensors"),
        load_file(straight.out_dir / "adapter_model.safetensors"),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


def test_a_checkpoint_of_another_run_is_refused_not_mixed_in(tiny_base: Path, chats: Path, tmp_path: Path) -> None:
    def stop_at_first_checkpoint(message: str) -> None:
        if "checkpoint saved" in message:
            raise Stop

    out = tmp_path / "adapter"
    with pytest.raises(Stop):
        _resumable(tiny_base, chats, out, stop_at_first_checkpoint)
    with pytest.raises(train_lora.TrainingError, match=r"belongs to another run .* delete it to start afresh"):
        _resumable(tiny_base, chats, out, quiet, lr=1e-3)
    assert train_lora.checkpoint_path(out).is_file() and not out.exists()
