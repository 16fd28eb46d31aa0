"""`student dataset check`: per-task counts, malformed lines, duplicates, empty answers, reasoning, split."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from models.chat_data import load_chat_jsonl
from models.dataset_check import check_dataset, question_key
from server.runtime import cli

SYSTEM = "Bạn là trợ lý chăm sóc khách hàng của cửa hàng."


def row(question: str, answer: str, task: str | None = "response", **extra: object) -> dict[str, object]:
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": answer},
    ]
    data: dict[str, object] = {"messages": messages, **extra}
    if task is not None:
        data["task"] = task
    return data


def write(path: Path, rows: list[object]) -> Path:
    lines = [item if isinstance(item, str) else json.dumps(item, ensure_ascii=False) for item in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def clean_rows() -> list[dict[str, object]]:
    return [
        row("Đơn hàng DH1 đang ở đâu?", "Đơn DH1 đang được giao, dự kiến 2 ngày nữa."),
        row("Shop có nhận MoMo không?", "Cửa hàng nhận ví MoMo và ZaloPay."),
        row("Phí đổi size là bao nhiêu?", "Đổi size lần đầu miễn phí."),
        row("Vì sao đơn bị hủy?", "<think>Quá hạn 24 giờ.</think>\n\nĐơn bị hủy vì quá hạn.", "cot"),
        row("Vì sao hoàn tiền chậm?", "Ngân hàng xử lý 5-7 ngày.", "cot", reasoning="Qua ngân hàng."),
        row("Máy hỏng sau 3 tháng, có được bảo hành không?", "policy", "classification"),
    ]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["dataset", "check", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_data_passes_with_a_table_per_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "data.jsonl", clean_rows())

    code, out, err = run_cli([str(path), "--min-per-task", "1"], capsys)

    assert code == 0, out
    assert err == ""
    assert f"dataset check: {path} (6 lines, 6 usable samples)" in out
    table = [line.split() for line in out.splitlines()]
    assert ["classification", "1", "1", "ok"] in table
    assert ["cot", "2", "1", "ok"] in table
    assert ["response", "3", "1", "ok"] in table
    assert ["total", "6"] in table
    assert "malformed lines: none" in out and "exact duplicates (groups): none" in out
    assert out.rstrip().endswith("result: passed")


def test_a_task_below_the_minimum_fails_unless_small_tasks_are_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "data.jsonl", clean_rows())

    code, out, _ = run_cli([str(path)], capsys)
    assert code == 1
    assert ["response", "3", "1000", "BELOW:", "997", "short"] in [line.split() for line in out.splitlines()]
    assert "result: FAILED: 3 tasks below the minimum of 1000 samples " in out
    assert "(classification has 1, cot has 2, response has 3)" in out

    code, out, _ = run_cli([str(path), "--allow-small"], capsys)
    assert code == 0
    assert "warning: 3 tasks below the minimum of 1000 samples" in out
    assert ["response", "3", "1000", "below:", "997", "short"] in [line.split() for line in out.splitlines()]


def test_rows_without_a_task_count_as_none(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", [row("Xin chào?", "Chào bạn, shop giúp gì được ạ?", task=None)])

    report = check_dataset(path, min_per_task=1)

    assert [(count.task, count.samples) for count in report.tasks] == [("(none)", 1)]
    assert report.passed


def test_malformed_lines_are_named_by_line_number_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = json.dumps(clean_rows()[0], ensure_ascii=False)
    no_answer = {"messages": [{"role": "user", "content": "Alo?"}], "task": "qa"}
    lines = [
        good,
        "",
        "{not json",
        json.dumps({"messages": [{"role": "bot", "content": "Chào"}]}),
        json.dumps(no_answer),
        json.dumps(row("Hỏi?", "Trả lời đầy đủ.", task=7)),
        json.dumps(row("Hỏi?", "Trả lời đầy đủ.", reasoning=["a"])),
    ]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")

    report = check_dataset(path, min_per_task=1)

    assert [(entry.line, entry.reason) for entry in report.malformed] == [
        (3, "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
        (4, "message 0 has role 'bot'; expected one of ('system', 'user', 'assistant')"),
        (5, "no assistant message: nothing to train on"),
        (6, '"task" is 7; expected a non-empty string'),
        (7, '"reasoning" is not a string'),
        (8, "not valid UTF-8 (byte 0)"),
    ]
    assert (report.lines, report.samples) == (7, 1)
    assert report.problems == ("6 malformed lines",)


def test_exact_duplicates_ignore_whitespace_but_not_case(tmp_path: Path) -> None:
    rows = clean_rows()
    spaced = row("Đơn hàng  DH1 đang ở đâu? ", " Đơn DH1 đang được giao,\ndự kiến 2 ngày nữa.", id="x7")
    shouted = row("ĐƠN HÀNG DH1 ĐANG Ở ĐÂU", "Đơn DH1 đang được giao, dự kiến 2 ngày nữa.")
    path = write(tmp_path / "data.jsonl", [*rows, spaced, rows[0], shouted])

    report = check_dataset(path, min_per_task=1)

    assert [group.lines for group in report.exact_duplicates] == [(1, 7, 8)]
    assert report.exact_duplicates[0].text == "Đơn hàng DH1 đang ở đâu?"
    assert "2 exact duplicates of earlier samples" in report.problems
    assert [group.lines for group in report.near_duplicate_questions] == [(1, 7, 8, 9)]


def test_near_duplicate_questions_only_warn(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [
        *clean_rows(),
        row("shop có nhận momo không", "Có ạ, shop nhận MoMo."),
        row("Shop có nhận... MoMo, không?!", "Dạ có, bạn chọn MoMo khi thanh toán."),
    ]
    path = write(tmp_path / "data.jsonl", rows)

    code, out, _ = run_cli([str(path), "--min-per-task", "1", "--json"], capsys)

    report = json.loads(out)
    assert code == 0 and report["passed"] is True
    assert report["near_duplicate_questions"] == [{"lines": [2, 7, 8], "text": "shop có nhận momo không"}]
    assert report["warnings"] == ["1 question asked by several different samples (3 samples)"]


def test_question_key_folds_case_punctuation_and_whitespace_only() -> None:
    assert question_key("  Đơn   DH-12 của MÌNH đâu rồi?!  ") == "đơn dh 12 của mình đâu rồi"
    assert question_key("Đơn hàng") != question_key("Don hang")  # diacritics are meaning, not noise
    assert question_key(unicodedata.normalize("NFD", "Đơn hàng")) == question_key("Đơn hàng")


def test_near_empty_answers_fail_and_the_threshold_is_an_option(tmp_path: Path) -> None:
    rows = [
        *clean_rows(),
        row("Còn hàng không?", ""),
        row("Có size 42 không?", " ... "),
        row("Vì sao?", "<think>Suy nghĩ rất dài.</think>\n\n", "cot"),
        row("Loại câu hỏi?", "ok", "classification"),
    ]
    path = write(tmp_path / "data.jsonl", rows)

    report = check_dataset(path, min_per_task=1)

    assert [(entry.line, entry.task) for entry in report.near_empty] == [
        (7, "response"),
        (8, "response"),
        (9, "cot"),
        (10, "classification"),
    ]
    assert report.near_empty[1].detail == "answer has 0 letters or digits: ' ... '"
    assert "4 near-empty answers (fewer than 3 letters or digits)" in report.problems
    lenient = check_dataset(path, min_per_task=1, min_answer_chars=1)
    assert [entry.line for entry in lenient.near_empty] == [7, 8, 9]


def test_cot_samples_need_a_think_block_or_a_reasoning_field(tmp_path: Path) -> None:
    rows = [
        *clean_rows(),
        row("Vì sao giao chậm?", "Do kho quá tải dịp lễ.", "cot"),
        row("Vì sao phí ship cao?", "<think>  </think>Do giao hỏa tốc.", "cot", reasoning=" "),
        row("Vì sao không áp mã?", "Mã chỉ áp dụng cho đơn từ 500.000đ.", "response"),
    ]
    path = write(tmp_path / "data.jsonl", rows)

    report = check_dataset(path, min_per_task=1)

    assert [entry.line for entry in report.cot_missing_reasoning] == [7, 8]
    assert "2 cot samples without reasoning" in report.problems


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def numbered_rows(start: int, stop: int) -> list[dict[str, object]]:
    return [
        row(f"Đơn hàng DH{number} đang ở đâu?", f"Đơn DH{number} đang giao.", id=f"s{number}")
        for number in range(start, stop)
    ]


def test_split_is_deterministic_and_adding_samples_moves_none(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", numbered_rows(0, 300))
    first = check_dataset(path, min_per_task=1, split_out=tmp_path / "a", seed=0).split
    again = check_dataset(path, min_per_task=1, split_out=tmp_path / "b", seed=0).split
    write(path, numbered_rows(0, 450))
    grown = check_dataset(path, min_per_task=1, split_out=tmp_path / "c", seed=0).split
    reseeded = check_dataset(path, min_per_task=1, split_out=tmp_path / "d", seed=1).split
    assert first and again and grown and reseeded

    sides = {}
    for name in "abcd":
        sides[name] = {
            item["id"]: side
            for side in ("train", "validation")
            for item in read_jsonl(tmp_path / name / f"{side}.jsonl")
        }
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    assert first.train + first.validation == 300 and 15 <= first.validation <= 45
    assert all(sides["c"][key] == side for key, side in sides["a"].items())
    assert sides["d"] != sides["c"]


def test_split_keeps_rows_as_written_drops_copies_and_keeps_a_question_on_one_side(tmp_path: Path) -> None:
    rows = numbered_rows(0, 40)
    rephrased = [row(f"đơn hàng dh{n} đang ở đâu", "Shop kiểm tra ngay.", id=f"r{n}") for n in range(40)]
    path = write(tmp_path / "data.jsonl", [*rows, *rephrased, rows[3], "{broken"])

    report = check_dataset(path, min_per_task=1, split_out=tmp_path / "split", validation_fraction=0.3)

    assert report.split is not None
    assert (report.split.train + report.split.validation, report.split.left_out_duplicates) == (80, 1)
    train = read_jsonl(tmp_path / "split" / "train.jsonl")
    validation = read_jsonl(tmp_path / "split" / "validation.jsonl")
    assert all(item in rows + rephrased for item in train + validation)  # extra keys kept, nothing rewritten
    train_ids = [str(item["id"]) for item in train]
    assert train_ids == sorted(train_ids, key=lambda key: (key[0] == "r", int(key[1:])))  # file order
    validation_numbers = {str(item["id"])[1:] for item in validation}
    assert validation_numbers.isdisjoint(key[1:] for key in train_ids)
    assert load_chat_jsonl(tmp_path / "split" / "validation.jsonl")


def test_a_tiny_split_still_gets_one_validation_question(tmp_path: Path) -> None:
    path = write(tmp_path / "data.jsonl", numbered_rows(0, 3))

    split = check_dataset(path, min_per_task=1, split_out=tmp_path / "split", validation_fraction=0.01).split

    assert split is not None and (split.train, split.validation) == (2, 1)


def test_drop_flagged_leaves_empty_answers_and_cot_without_reasoning_out_of_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = row("Shop ơi?", "", id="empty")
    bare_cot = row("Vì sao đơn bị hủy?", "Đơn bị hủy.", "cot", id="bare")
    rows = [*numbered_rows(0, 20), empty, bare_cot, empty]
    path = write(tmp_path / "data.jsonl", rows)
    argv = [str(path), "--min-per-task", "1", "--split-out"]

    kept_code, kept_out, _ = run_cli([*argv, str(tmp_path / "all")], capsys)
    code, out, _ = run_cli([*argv, str(tmp_path / "clean"), "--drop-flagged"], capsys)

    def ids(name: str) -> list[str]:
        sides = [read_jsonl(tmp_path / name / f"{side}.jsonl") for side in ("train", "validation")]
        return sorted(str(item["id"]) for side in sides for item in side)

    assert ids("all") == sorted([*(f"s{n}" for n in range(20)), "empty", "bare"])
    assert ids("clean") == sorted(f"s{n}" for n in range(20))
    assert "1 duplicates left out" in kept_out
    assert "0 duplicates, 3 flagged left out" in out  # flagged first: both copies of `empty`
    assert code == kept_code == 1 and "1 cot sample without reasoning" in out  # the file still fails
    report = check_dataset(path, min_per_task=1, split_out=tmp_path / "again", drop_flagged=True)
    assert report.split is not None and report.split.left_out_flagged == 3


def test_json_report_lists_everything_and_the_exit_status_follows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [*clean_rows(), clean_rows()[1], row("Vì sao?", "Vì vậy.", "cot")]
    path = write(tmp_path / "data.jsonl", [*rows, "[]"])

    argv = [str(path), "--json", "--min-per-task", "2", "--split-out", str(tmp_path / "s")]
    code, out, _ = run_cli(argv, capsys)

    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    assert report["format"] == "student-dataset-check/1"
    assert report["tasks"]["classification"] == {"samples": 1, "minimum": 2, "below_minimum": True}
    assert report["malformed"] == [{"line": 9, "reason": 'expected an object with a "messages" list'}]
    assert report["exact_duplicates"] == [{"lines": [2, 7], "text": "Shop có nhận MoMo không?"}]
    assert [entry["line"] for entry in report["cot_missing_reasoning"]] == [8]
    assert report["split"]["left_out_duplicates"] == 1
    assert report["problems"] == [
        "1 malformed line",
        "1 task below the minimum of 2 samples (classification has 1)",
        "1 exact duplicate of earlier samples",
        "1 cot sample without reasoning",
    ]


def test_long_findings_are_cut_in_the_table_but_not_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "data.jsonl", [row(f"Câu {number}?", "", id=number) for number in range(13)])

    _, out, _ = run_cli([str(path), "--min-per-task", "1"], capsys)
    assert "near-empty answers (< 3 letters or digits): 13" in out
    assert "  ... and 3 more (--json lists all)" in out
    _, out, _ = run_cli([str(path), "--min-per-task", "1", "--json"], capsys)
    assert len(json.loads(out)["near_empty"]) == 13


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{tmp}/absent.jsonl"], "dataset file {tmp}/absent.jsonl does not exist"),
        (["{tmp}"], "dataset path {tmp} is not a file"),
        (["{data}", "--validation-fraction", "1"], "--validation-fraction must be between 0 and 1, not 1.0"),
        (["{data}", "--split-out", "{data}"], "--split-out {data} exists and is not a directory"),
        (["{data}", "--drop-flagged"], "--drop-flagged leaves samples out of the split: it needs --split-out DIR"),
    ],
)
def test_unusable_input_is_a_one_line_error(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write(tmp_path / "data.jsonl", clean_rows())
    names = {"tmp": tmp_path, "data": data}

    code, out, err = run_cli([arg.format(**names) for arg in argv], capsys)

    assert code == 1 and out == ""
    assert err == f"student dataset check: error: {message.format(**names)}\n"


def test_loader_and_check_agree_on_line_separators_inside_strings(tmp_path: Path) -> None:
    """U+2028 and U+0085 inside a JSON string do not end the line (`str.splitlines` says they do)."""
    path = write(tmp_path / "data.jsonl", [row("Xin chào\u2028shop?", "Chào bạn\x85, shop giúp gì ạ?")])

    assert check_dataset(path, min_per_task=1).passed
    assert load_chat_jsonl(path)[0].messages[1].content == "Xin chào\u2028shop?"


def test_the_check_runs_without_torch_or_transformers(tmp_path: Path) -> None:
    """A JSONL check should not pay for the training stack's imports (2 s of the command's 2.4 s here)."""
    data = write(tmp_path / "chats.jsonl", [row("Shop mở cửa lúc mấy giờ?", "Từ 8h đến 22h mỗi ngày.")])
    code = (
        "import json, sys\n"
        "from server.runtime.cli import main\n"
        f"code = main(['dataset', 'check', {str(data)!r}, '--allow-small'])\n"
        "print(json.dumps([code, sorted(name for name in ('torch', 'transformers', 'peft') if name in sys.modules)]))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == [0, []]
