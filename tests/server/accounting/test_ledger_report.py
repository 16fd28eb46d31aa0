"""`student report` end to end: a real ledger file in, exact sums out as JSON, CSV and a table."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from server.accounting.ledger import EnergyRow, Ledger, RequestRow
from server.accounting.ledger_report import parse_since
from server.runtime.cli import main

TZ_NAME = "Asia/Ho_Chi_Minh"
TZ = ZoneInfo(TZ_NAME)
REASON = "no power meter: NVML found no GPU and RAPL counters are not readable"


def _today() -> date:
    return datetime.now(TZ).date()


DAY1, DAY2, DAY3 = (_today() - timedelta(days=n) for n in (3, 2, 1))


def _at(day: date, hour: int, minute: int = 0) -> float:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=TZ).timestamp()


def _request(
    finished_at: float, status: int, prompt: int | None, completion: int | None, gpt: float, deepseek: float
) -> RequestRow:
    return RequestRow(
        finished_at=finished_at, route="/v1/chat/completions", upstream="http://127.0.0.1:8001", model="student",
        stream=True, status=status, prompt_tokens=prompt, completion_tokens=completion, ttft_ms=10.0, tpot_ms=2.0,
        e2e_ms=100.0, energy_j=1.0, electricity_cost=0.001, currency="VND",
        api_cost_usd={"gpt-4.1": gpt, "deepseek-v3.2": deepseek},
    )  # fmt: skip


def _energy(
    ended_at: float, total_j: float | None, cost: float | None, cost_usd: float | None, reason: str = ""
) -> EnergyRow:
    ok = total_j is not None
    return EnergyRow(
        started_at=ended_at - 1800, ended_at=ended_at, status="ok" if ok else "unavailable",
        source="nvml" if ok else "unavailable", reason=reason, total_j=total_j,
        idle_j=total_j * 0.5 if ok else None, attributed_j=total_j * 0.25 if ok else None,
        unattributed_j=total_j * 0.25 if ok else None, electricity_cost=cost, electricity_cost_usd=cost_usd,
        currency="VND",
    )  # fmt: skip


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """Three local days: DAY1 measured, DAY2 not (with a reason), DAY3 measured."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    ledger.add_request(_request(_at(DAY1, 9), 200, 100, 10, gpt=0.25, deepseek=0.125))
    ledger.add_request(_request(_at(DAY1, 23, 30), 200, 200, 20, gpt=0.5, deepseek=0.25))
    ledger.add_request(_request(_at(DAY2, 0, 30), 499, None, None, gpt=0.0, deepseek=0.0))  # next local day
    ledger.add_request(_request(_at(DAY3, 12), 500, 50, 0, gpt=1.0, deepseek=0.5))
    ledger.add_energy(_energy(_at(DAY1, 10), 3.6e6, cost=3000.0, cost_usd=0.125))
    ledger.add_energy(_energy(_at(DAY1, 11), 1.8e6, cost=1500.0, cost_usd=0.0625))
    ledger.add_energy(_energy(_at(DAY2, 10), None, None, None, reason=REASON))
    ledger.add_energy(_energy(_at(DAY3, 13), 0.36e6, cost=300.0, cost_usd=0.0125))
    ledger.add_request(_request(_at(_today() - timedelta(days=60), 12), 200, 999, 999, gpt=9.0, deepseek=9.0))
    ledger.close()
    return path


def _report(path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str, str]:
    code = main(["report", "--ledger", str(path), "--tz", TZ_NAME, *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_has_exact_daily_and_total_sums(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _report(ledger_path, capsys, "--since", "30d", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["ledger"] == str(ledger_path) and report["window"] == "30d" and report["currency"] == "VND"
    assert report["apis"] == ["deepseek-v3.2", "gpt-4.1"]

    day1, day2, day3 = report["days"]
    assert [day["date"] for day in report["days"]] == [DAY1.isoformat(), DAY2.isoformat(), DAY3.isoformat()]
    assert (day1["requests"], day1["errors"], day1["prompt_tokens"], day1["completion_tokens"]) == (2, 0, 300, 30)
    assert day1["energy_kwh"] == pytest.approx(1.5) and day1["attributed_kwh"] == pytest.approx(0.375)
    assert (day1["electricity_cost"], day1["electricity_cost_usd"]) == (4500.0, 0.1875)
    assert day1["api_cost_usd"] == {"deepseek-v3.2": 0.375, "gpt-4.1": 0.75}
    assert day1["saving_usd"] == {"deepseek-v3.2": 0.1875, "gpt-4.1": 0.5625}
    assert day1["energy_status"] == "ok" and day1["energy_reasons"] == []

    assert (day2["requests"], day2["errors"], day2["prompt_tokens"], day2["completion_tokens"]) == (1, 1, 0, 0)
    assert day2["energy_status"] == "unavailable" and day2["energy_reasons"] == [REASON]
    assert day2["energy_kwh"] is None and day2["electricity_cost"] is None
    assert day2["saving_usd"] == {"deepseek-v3.2": None, "gpt-4.1": None}

    assert (day3["requests"], day3["errors"], day3["energy_kwh"]) == (1, 1, pytest.approx(0.1))
    assert day3["saving_usd"] == {"deepseek-v3.2": 0.4875, "gpt-4.1": 0.9875}

    total = report["total"]
    assert (total["requests"], total["errors"], total["prompt_tokens"], total["completion_tokens"]) == (4, 2, 350, 30)
    assert total["energy_kwh"] == pytest.approx(1.6)
    assert (total["electricity_cost"], total["electricity_cost_usd"]) == (4800.0, 0.2)
    assert total["api_cost_usd"] == {"deepseek-v3.2": 0.875, "gpt-4.1": 1.75}
    assert total["saving_usd"] == pytest.approx({"deepseek-v3.2": 0.675, "gpt-4.1": 1.55})
    assert report["energy"] == {"status": "partial", "reasons": [REASON]}


def test_since_limits_the_window(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _report(ledger_path, capsys, "--since", "90d", "--json")
    assert json.loads(out)["total"]["requests"] == 5  # now includes the request 60 days ago
    _, out, _ = _report(ledger_path, capsys, "--since", "1h", "--json")
    assert json.loads(out)["days"] == []


def test_usd_rate_converts_the_electricity(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _report(ledger_path, capsys, "--since", "30d", "--json", "--usd-rate", "30000")
    day1 = json.loads(out)["days"][0]
    assert day1["electricity_cost_usd"] == pytest.approx(0.15)
    assert day1["saving_usd"]["gpt-4.1"] == pytest.approx(0.6)


def test_csv_has_one_row_per_day(ledger_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "report.csv"
    code, out, err = _report(ledger_path, capsys, "--since", "30d", "--csv", str(target))
    assert code == 0 and out == "" and str(target) in err
    rows = list(csv.DictReader(target.open(newline="")))
    assert [row["date"] for row in rows] == [DAY1.isoformat(), DAY2.isoformat(), DAY3.isoformat()]
    assert rows[0]["requests"] == "2" and rows[0]["prompt_tokens"] == "300"
    assert float(rows[0]["energy_kwh"]) == pytest.approx(1.5)
    assert float(rows[0]["electricity_cost_VND"]) == 4500.0
    assert float(rows[0]["api_cost_usd_gpt-4.1"]) == 0.75 and float(rows[0]["saving_usd_gpt-4.1"]) == 0.5625
    assert rows[1]["energy_status"] == "unavailable"
    assert rows[1]["energy_kwh"] == rows[1]["electricity_cost_VND"] == rows[1]["saving_usd_gpt-4.1"] == ""

    _, out, _ = _report(ledger_path, capsys, "--since", "30d", "--csv", "-")
    assert list(csv.DictReader(io.StringIO(out))) == rows


def test_table_shows_the_numbers_and_why_energy_is_missing(
    ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _report(ledger_path, capsys, "--since", "30d")
    assert code == 0
    lines = out.splitlines()
    day1 = next(line for line in lines if line.startswith(DAY1.isoformat()) and "1.500" in line)
    assert day1.split() == [DAY1.isoformat(), "2", "0", "300", "30", "1.500", "4,500"]
    day2 = next(line for line in lines if line.startswith(DAY2.isoformat()) and "unavailable" in line)
    assert day2.split() == [DAY2.isoformat(), "1", "1", "0", "0", "unavailable", "unavailable"]
    total = next(line for line in lines if line.startswith("TOTAL") and "1.600" in line)
    assert total.split() == ["TOTAL", "4", "2", "350", "30", "1.600*", "4,800*"]
    costs_total = [line for line in lines if line.startswith("TOTAL")][1]
    assert costs_total.split() == ["TOTAL", "0.200", "0.88", "0.68", "1.75", "1.55"]
    assert f"{DAY2.isoformat()}: {REASON}" in out
    assert "idle included" in out


def test_unmeasured_energy_is_never_shown_as_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    ledger.add_request(_request(_at(DAY3, 12), 200, 10, 10, gpt=0.5, deepseek=0.25))
    ledger.add_energy(_energy(_at(DAY3, 13), None, None, None, reason=REASON))
    ledger.close()

    _, out, _ = _report(path, capsys, "--since", "7d")
    day = next(line for line in out.splitlines() if line.startswith(DAY3.isoformat()))
    assert day.split()[-2:] == ["unavailable", "unavailable"]
    assert REASON in out and "kWh measured:" not in out

    _, out, _ = _report(path, capsys, "--since", "7d", "--json")
    report = json.loads(out)
    assert report["total"]["energy_kwh"] is None and report["total"]["electricity_cost"] is None
    assert report["energy"] == {"status": "unavailable", "reasons": [REASON]}


def test_ledger_path_comes_from_the_environment(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STUDENT_LEDGER_PATH", str(ledger_path))
    assert main(["report", "--since", "30d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ledger"] == str(ledger_path)


def test_missing_ledger_exits_1_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.sqlite3"
    code, out, err = _report(missing, capsys)
    assert code == 1 and out == ""
    assert err.strip() == f"student report: no ledger at {missing}: start `student serve` first, or pass --ledger"
    assert not missing.exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--since", "3w"],
        ["--since", "0d"],
        ["--tz", "Mars/Olympus"],
        ["--usd-rate", "0"],
        ["--csv", "/no/such/dir/report.csv"],
    ],
)
def test_bad_values_exit_1_with_one_line(
    ledger_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str]
) -> None:
    code = main(["report", "--ledger", str(ledger_path), *flags])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("student report: ") and err.count("\n") == 1


def test_json_and_csv_cannot_be_combined(ledger_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["report", "--ledger", str(ledger_path), "--json", "--csv", "-"])
    assert exited.value.code == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", timedelta(hours=24)),
        ("7d", timedelta(days=7)),
        ("30d", timedelta(days=30)),
        (" 12H ", timedelta(hours=12)),
        ("1d", timedelta(days=1)),
    ],
)
def test_parse_since(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "0h", "-1d", "1.5d", "7 days", "2w"])
def test_parse_since_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="such as 24h, 7d or 30d"):
        parse_since(text)


def test_parse_since_rejects_absurd_windows() -> None:
    assert parse_since("36500d") == timedelta(days=36_500)
    with pytest.raises(ValueError, match="at most 36500d"):
        parse_since("99999999999d")


# --- hybrid routing -------------------------------------------------------------------------


@pytest.fixture
def hybrid_ledger(tmp_path: Path) -> Path:
    """DAY3: two requests answered locally, two by the remote API ($0.25 each), energy measured."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    for hour in (9, 10):
        local = _request(_at(DAY3, hour), 200, 100, 10, gpt=0.25, deepseek=0.125)
        ledger.add_request(replace(local, routed_to="local", route_reason="default"))
        remote = _request(_at(DAY3, hour, 30), 200, 100, 10, gpt=1.0, deepseek=0.5)
        ledger.add_request(
            replace(remote, upstream="https://api.example", energy_j=None, electricity_cost=None, routed_to="remote",
                    route_reason="keyword:tại sao", remote_cost_usd=0.25)
        )  # fmt: skip
    ledger.add_energy(_energy(_at(DAY3, 13), 3.6e6, cost=3000.0, cost_usd=0.125))  # 24,000 VND per USD
    ledger.close()
    return path


def test_each_route_has_its_requests_tokens_and_own_cost(
    hybrid_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = _report(hybrid_ledger, capsys, "--since", "7d", "--json")
    (day,) = json.loads(out)["days"]
    local, remote = day["routes"]["local"], day["routes"]["remote"]
    assert (local["requests"], local["prompt_tokens"], local["completion_tokens"]) == (2, 200, 20)
    assert local["electricity_cost"] == pytest.approx(0.002)  # attributed to its requests, idle not included
    assert local["cost_usd"] == pytest.approx(0.002 / 24_000)  # at the rate stored with the day's energy
    assert (remote["requests"], remote["electricity_cost"], remote["cost_usd"]) == (2, None, 0.5)
    assert day["remote_cost_usd"] == 0.5
    # The same tokens on GPT-4.1 ($2.50) against what was spent: electricity $0.125 and the remote $0.50.
    assert day["saving_usd"]["gpt-4.1"] == pytest.approx(2.5 - 0.125 - 0.5)
    assert json.loads(out)["total"]["routes"]["remote"]["cost_usd"] == 0.5

    _, out, _ = _report(hybrid_ledger, capsys, "--since", "7d")
    lines = out.splitlines()
    assert "saving = API cost − electricity − remote" in out and "By route" in out
    rows = [line.split() for line in lines if line.split()[:2] in ([DAY3.isoformat(), "remote"], ["TOTAL", "remote"])]
    # One column, one number of decimals: enough for the local route's tiny cost in USD.
    expected = ["remote", "2", "0", "200", "20", "-", "0.500000"]
    assert rows == [[DAY3.isoformat(), *expected], ["TOTAL", *expected]]

    _, out, _ = _report(hybrid_ledger, capsys, "--since", "7d", "--csv", "-")
    (row,) = csv.DictReader(io.StringIO(out))
    assert (row["local_requests"], row["remote_requests"], float(row["remote_cost_usd"])) == ("2", "2", 0.5)
    assert float(row["local_cost_usd"]) == pytest.approx(0.002 / 24_000)


def test_without_a_remote_there_is_no_route_table(ledger_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _report(ledger_path, capsys, "--since", "30d")
    assert "By route" not in out and "− remote" not in out
    _, out, _ = _report(ledger_path, capsys, "--since", "30d", "--json")
    assert list(json.loads(out)["total"]["routes"]) == ["local"]


GPU1, GPU2 = "http://gpu1:8001", "http://gpu2:8001"
DOWN = "DCGM exporter http://gpu2:9400/metrics unreachable: connection refused: is the exporter running?"


@pytest.fixture
def replicas_ledger(tmp_path: Path) -> Path:
    """DAY3: two replicas measured through their own DCGM exporters; gpu2's was down for half an hour."""
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path)
    ledger.add_request(replace(_request(_at(DAY3, 9), 200, 100, 10, gpt=0.25, deepseek=0.125), upstream=GPU1))
    ledger.add_request(replace(_request(_at(DAY3, 9, 5), 200, 100, 10, gpt=0.25, deepseek=0.125), upstream=GPU2))
    ledger.add_energy(replace(_energy(_at(DAY3, 10), 3.6e6, cost=3000.0, cost_usd=0.125), source="dcgm", replica=GPU1))
    ledger.add_energy(replace(_energy(_at(DAY3, 10), 1.8e6, cost=1500.0, cost_usd=0.0625), source="dcgm", replica=GPU2))
    ledger.add_energy(replace(_energy(_at(DAY3, 10, 30), None, None, None, reason=DOWN), source="dcgm", replica=GPU2))
    ledger.close()
    return path


def test_each_replica_has_its_own_energy_and_why_one_was_not_measured(
    replicas_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = _report(replicas_ledger, capsys, "--since", "7d", "--json")
    report = json.loads(out)
    (day,) = report["days"]
    first, second = day["replicas"][GPU1], day["replicas"][GPU2]
    assert (first["energy_status"], first["energy_kwh"], first["electricity_cost"]) == ("ok", 1.0, 3000.0)
    assert (second["energy_status"], second["energy_kwh"], second["electricity_cost"]) == ("partial", 0.5, 1500.0)
    assert second["energy_reasons"] == [DOWN] and first["energy_reasons"] == []
    assert (day["energy_kwh"], day["electricity_cost"], day["energy_status"]) == (1.5, 4500.0, "partial")
    assert day["energy_measured_s"] == 1800.0  # the longest any one replica was measured, not their sum
    assert report["total"]["replicas"][GPU2]["energy_kwh"] == 0.5
    assert report["energy"]["reasons"] == [f"{GPU2}: {DOWN}"]

    _, out, _ = _report(replicas_ledger, capsys, "--since", "7d")
    assert "Energy by replica" in out
    rows = [line.split() for line in out.splitlines() if line.split()[1:2] in ([GPU1], [GPU2])]
    assert rows[:2] == [
        [DAY3.isoformat(), GPU1, "1.000", "0.250", "3,000", "0.125"],
        [DAY3.isoformat(), GPU2, "0.500*", "0.125", "1,500", "0.062"],
    ]
    assert f"{DAY3.isoformat()}: {GPU2}: {DOWN}" in out


def test_a_ledger_of_this_host_alone_has_no_replica_table(
    ledger_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = _report(ledger_path, capsys, "--since", "30d")
    assert "Energy by replica" not in out
    _, out, _ = _report(ledger_path, capsys, "--since", "30d", "--json")
    assert list(json.loads(out)["total"]["replicas"]) == ["this host"]
