"""`student merge` on tiny real models: merged == base+adapter, manifest, and each bad input."""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import datetime
from pathlib import Path

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from models import merge
from models.merge import (
    MANIFEST_NAME,
    AdapterMismatchError,
    InputError,
    MergeError,
    OutputExistsError,
    VerificationError,
    merge_adapter,
)
from models.tiny import build_random_llama
from models.tokenizer import train_tokenizer
from tests.models.helpers import (
    ALL_LINEAR,
    build_tiny_gpt2,
    chat_ids,
    logits_of,
    make_lora_adapter,
    sha256_of,
)

QUESTION = "Đơn hàng DH512377 của mình giao trễ ba ngày rồi, shop kiểm tra giúp mình với."


def quiet(_: str) -> None:
    """Progress sink: the tests check results, not chatter."""


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_adapter: Path) -> merge.MergeResult:
    return merge_adapter(tiny_base, tiny_adapter, tmp_path_factory.mktemp("merged") / "out", progress=quiet)


@pytest.fixture(scope="module")
def other_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with a different vocabulary (other text, other size) than `small_tokenizer`."""
    return train_tokenizer(["Hello, where is my parcel? Refunds take five days."] * 20, vocab_size=300)


def test_merged_model_equals_base_plus_adapter(merged: merge.MergeResult, tiny_base: Path, tiny_adapter: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    input_ids = chat_ids(tokenizer, QUESTION)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    expected = logits_of(PeftModel.from_pretrained(base, str(tiny_adapter)).eval(), input_ids)
    base_alone = logits_of(AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval(), input_ids)
    actual = logits_of(AutoModelForCausalLM.from_pretrained(str(merged.out_dir)).eval(), input_ids)

    assert float((actual - expected).abs().max()) < 1e-4
    adapter_effect = float((actual - base_alone).abs().max())
    assert adapter_effect > 0.1, "without an adapter effect this test proves nothing"
    assert merged.verification.passed
    assert merged.verification.max_abs_diff <= merged.verification.tolerance
    assert merged.verification.adapter_effect_max_abs_diff > 100 * merged.verification.tolerance


def test_output_is_a_complete_servable_model_directory(merged: merge.MergeResult, tiny_base: Path) -> None:
    names = {path.name for path in merged.out_dir.iterdir()}
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", MANIFEST_NAME}
    assert expected <= names
    assert not any(name.endswith(".bin") for name in names)
    tokenizer = AutoTokenizer.from_pretrained(str(merged.out_dir))
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(tiny_base)).get_vocab()
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert GenerationConfig.from_pretrained(str(merged.out_dir)).eos_token_id == tokenizer.eos_token_id
    assert not list(merged.out_dir.parent.glob(".out.tmp-*")), "the staging directory must be gone"


def test_manifest_records_inputs_hashes_and_verification(
    merged: merge.MergeResult, tiny_base: Path, tiny_adapter: Path
) -> None:
    manifest = json.loads(merged.manifest_path.read_text(encoding="utf-8"))

    assert manifest["format"] == merge.MANIFEST_FORMAT
    assert manifest["dtype"] == "float32"
    assert (manifest["device"], merged.device) == ("cpu", "cpu")
    assert manifest["device_name"]
    assert manifest["base"]["path"] == str(tiny_base.resolve())
    base_digest = sha256_of(tiny_base / "model.safetensors")
    assert manifest["base"]["weights_sha256"] == {"model.safetensors": base_digest}
    adapter = manifest["adapter"]
    assert adapter["path"] == str(tiny_adapter.resolve())
    assert (adapter["r"], adapter["lora_alpha"]) == (4, 8)
    assert adapter["target_modules"] == sorted(ALL_LINEAR)
    adapter_digest = sha256_of(tiny_adapter / "adapter_model.safetensors")
    assert adapter["weights_sha256"] == {"adapter_model.safetensors": adapter_digest}
    weights = manifest["weights"]
    assert set(weights) == {"model.safetensors"}
    for name, entry in weights.items():
        assert entry["sha256"] == sha256_of(merged.out_dir / name)
        assert entry["bytes"] == (merged.out_dir / name).stat().st_size
    assert dict(merged.weight_sha256) == {name: entry["sha256"] for name, entry in weights.items()}
    verification = manifest["verification"]
    assert verification["passed"] is True
    assert verification["prompts"] == len(merge.VERIFY_CONVERSATIONS)
    assert verification["max_abs_diff"] == merged.verification.max_abs_diff
    assert verification["max_abs_diff"] <= verification["tolerance"]
    assert set(manifest["versions"]) >= {"torch", "transformers", "peft"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_merge_verifies_with_a_looser_tolerance(
    dtype: str, tmp_path: Path, tiny_base: Path, tiny_adapter: Path, merged: merge.MergeResult
) -> None:
    result = merge_adapter(tiny_base, tiny_adapter, tmp_path / "out", dtype=dtype, progress=quiet)

    assert result.verification.passed
    assert result.verification.tolerance > merged.verification.tolerance
    assert json.loads((result.out_dir / "config.json").read_text())["dtype"] == dtype
    assert AutoModelForCausalLM.from_pretrained(str(result.out_dir)).dtype == getattr(torch, dtype)


def test_failed_verification_is_recorded_and_never_published(
    tmp_path: Path, tiny_base: Path, tiny_adapter: Path
) -> None:
    out_dir = tmp_path / "out"

    with pytest.raises(VerificationError, match="verification failed") as raised:
        merge_adapter(tiny_base, tiny_adapter, out_dir, dtype="bfloat16", tolerance=1e-7, progress=quiet)

    assert not out_dir.exists()
    rejected = raised.value.result.out_dir
    assert rejected == tmp_path / "out.rejected"
    manifest = json.loads((rejected / MANIFEST_NAME).read_text())
    assert manifest["verification"]["passed"] is False
    assert manifest["verification"]["max_abs_diff"] > manifest["verification"]["tolerance"] == 1e-7


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_missing_directory(which: str, tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    dirs = {"base": tiny_base, "adapter": tiny_adapter, which: tmp_path / "nowhere"}
    with pytest.raises(InputError, match=f"the {which} directory .*nowhere does not exist"):
        merge_adapter(dirs["base"], dirs["adapter"], tmp_path / "out", progress=quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_empty_directory(which: str, tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    (tmp_path / "empty").mkdir()
    dirs = {"base": tiny_base, "adapter": tiny_adapter, which: tmp_path / "empty"}
    with pytest.raises(InputError, match=f"the {which} directory .*empty is empty"):
        merge_adapter(dirs["base"], dirs["adapter"], tmp_path / "out", progress=quiet)


def test_adapter_directory_without_adapter_config(tmp_path: Path, tiny_base: Path) -> None:
    with pytest.raises(InputError, match=r"has no adapter_config\.json"):
        merge_adapter(tiny_base, tiny_base, tmp_path / "out", progress=quiet)


def test_adapter_whose_target_modules_are_absent_from_the_base(
    tmp_path: Path, tiny_base: Path, small_tokenizer: PreTrainedTokenizerFast
) -> None:
    gpt2 = build_tiny_gpt2(small_tokenizer, tmp_path / "gpt2")
    adapter = make_lora_adapter(gpt2, tmp_path / "gpt2-adapter", target_modules=["c_attn"])

    message = r"targets modules c_attn, none of which exist in the base \(llama\)"
    with pytest.raises(AdapterMismatchError, match=message):
        merge_adapter(tiny_base, adapter, tmp_path / "out", progress=quiet)
    assert not (tmp_path / "out").exists()


def test_adapter_trained_on_a_base_with_another_hidden_size(
    tmp_path: Path, tiny_base: Path, small_tokenizer: PreTrainedTokenizerFast
) -> None:
    wider = build_random_llama(small_tokenizer, tmp_path / "wider", hidden_size=256, num_heads=4)
    adapter = make_lora_adapter(wider, tmp_path / "wider-adapter", target_modules=["q_proj", "v_proj"])

    message = (
        r"different hidden/layer sizes.*"
        r"q_proj.lora_A: adapter has shape \[4, 256\], the base needs \[4, 128\]"
    )
    with pytest.raises(AdapterMismatchError, match=message):
        merge_adapter(tiny_base, adapter, tmp_path / "out", progress=quiet)


def test_adapter_trained_on_a_base_with_another_vocabulary(
    tmp_path: Path, tiny_base: Path, other_tokenizer: PreTrainedTokenizerFast
) -> None:
    other = build_random_llama(other_tokenizer, tmp_path / "other")
    adapter = make_lora_adapter(other, tmp_path / "other-adapter", target_modules=["q_proj", "lm_head"])

    with pytest.raises(AdapterMismatchError, match=r"different vocabulary size.*lm_head"):
        merge_adapter(tiny_base, adapter, tmp_path / "out", progress=quiet)


def test_adapter_shipping_another_tokenizer(
    tmp_path: Path, tiny_base: Path, other_tokenizer: PreTrainedTokenizerFast
) -> None:
    other = build_random_llama(other_tokenizer, tmp_path / "other")
    adapter = make_lora_adapter(other, tmp_path / "other-adapter", ["q_proj"], save_tokenizer=True)

    with pytest.raises(AdapterMismatchError, match=r"adapter's tokenizer .* differs from the base's"):
        merge_adapter(tiny_base, adapter, tmp_path / "out", progress=quiet)


def test_adapter_for_a_deeper_base(tmp_path: Path, tiny_base: Path, small_tokenizer: PreTrainedTokenizerFast) -> None:
    deeper = build_random_llama(small_tokenizer, tmp_path / "deeper", num_layers=3)
    adapter = make_lora_adapter(deeper, tmp_path / "deeper-adapter", target_modules=["q_proj"])

    message = "different module names.*model.layers.2.self_attn.q_proj: no such module in the base"
    with pytest.raises(AdapterMismatchError, match=message):
        merge_adapter(tiny_base, adapter, tmp_path / "out", progress=quiet)


def test_existing_output_needs_force(tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "stale.txt").write_text("from an earlier run")

    with pytest.raises(OutputExistsError, match="already exists and is not empty; pass --force"):
        merge_adapter(tiny_base, tiny_adapter, out_dir, progress=quiet)
    assert (out_dir / "stale.txt").exists()

    result = merge_adapter(tiny_base, tiny_adapter, out_dir, force=True, progress=quiet)
    assert result.out_dir == out_dir.resolve()
    assert not (out_dir / "stale.txt").exists()
    assert (out_dir / MANIFEST_NAME).is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_empty_output_directory_is_fine_without_force(tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    (tmp_path / "out").mkdir()
    assert merge_adapter(tiny_base, tiny_adapter, tmp_path / "out", progress=quiet).verification.passed


def test_output_inside_an_input_is_refused_even_with_force(tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    with pytest.raises(OutputExistsError, match="overlaps the input directory"):
        merge_adapter(tiny_base, tiny_adapter, tiny_base, force=True, progress=quiet)
    assert (tiny_base / "model.safetensors").is_file()


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_before_anything_is_loaded_or_written(
    tmp_path: Path, tiny_base: Path, tiny_adapter: Path
) -> None:
    out_dir = tmp_path / "out"

    with pytest.raises(MergeError, match="--device cuda was asked for, but CUDA is not available: ") as raised:
        merge_adapter(tiny_base, tiny_adapter, out_dir, dtype="bfloat16", device="cuda", progress=quiet)

    assert "use --device cpu" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_unknown_device_is_refused(tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    with pytest.raises(MergeError, match="unknown device 'tpu'; choose one of cpu, cuda"):
        merge_adapter(tiny_base, tiny_adapter, tmp_path / "out", device="tpu", progress=quiet)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (scripts/gpu_check.py runs this on the GPU machine)")
def test_bfloat16_merge_on_the_gpu_verifies(
    tmp_path: Path, tiny_base: Path, tiny_adapter: Path, merged: merge.MergeResult
) -> None:
    result = merge_adapter(tiny_base, tiny_adapter, tmp_path / "out", dtype="bfloat16", device="cuda", progress=quiet)

    assert result.verification.passed
    assert result.device == "cuda"
    manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
    assert (manifest["device"], manifest["device_name"]) == ("cuda", torch.cuda.get_device_name())
    assert result.verification.adapter_effect_max_abs_diff > 10 * result.verification.tolerance


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="student merge")
    merge.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_reports_a_user_mistake_in_one_line(
    tmp_path: Path, tiny_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing, out_dir = tmp_path / "missing", tmp_path / "out"
    args = parse(["--base", str(missing), "--adapter", str(tiny_adapter), "--out", str(out_dir)])

    assert merge.run(args) == 1
    captured = capsys.readouterr()
    assert "student merge: error: the base directory" in captured.err
    assert "does not exist" in captured.err
    assert "Traceback" not in captured.err
    assert captured.out == ""


def test_cli_refuses_existing_output_then_force_replaces_it(
    tmp_path: Path, tiny_base: Path, tiny_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("x")
    argv = ["--base", str(tiny_base), "--adapter", str(tiny_adapter), "--out", str(out_dir)]

    assert merge.run(parse(argv)) == 1
    assert "pass --force" in capsys.readouterr().err

    assert merge.run(parse([*argv, "--force", "--dtype", "bfloat16"])) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out_dir.resolve())
    assert "[merge] verified on 5 prompts: max abs logit diff" in captured.err
    assert json.loads((out_dir / MANIFEST_NAME).read_text())["dtype"] == "bfloat16"


@pytest.mark.skipif(CUDA, reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_without_cuda_is_a_one_line_error(
    tmp_path: Path, tiny_base: Path, tiny_adapter: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base", str(tiny_base), "--adapter", str(tiny_adapter), "--out", str(tmp_path / "out")]

    assert parse(argv).device == "cpu"
    assert merge.run(parse([*argv, "--device", "cuda"])) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("student merge: error: --device cuda was asked for, but CUDA is not available")
    assert captured.err.count("\n") == 1
    assert captured.out == ""
    assert not (tmp_path / "out").exists()


def test_base_that_is_not_a_causal_language_model(tmp_path: Path, tiny_base: Path, tiny_adapter: Path) -> None:
    base = tmp_path / "t5"
    shutil.copytree(tiny_base, base)
    (base / "config.json").write_text(json.dumps({"model_type": "t5"}))

    with pytest.raises(InputError, match="is not a causal language model transformers can load"):
        merge_adapter(base, tiny_adapter, tmp_path / "out", progress=quiet)


def test_only_lora_adapters_are_merged(tmp_path: Path, tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    config = IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    get_peft_model(model, config).save_pretrained(str(tmp_path / "ia3"))

    with pytest.raises(InputError, match="is of type IA3; only LoRA adapters can be merged"):
        merge_adapter(tiny_base, tmp_path / "ia3", tmp_path / "out", progress=quiet)
