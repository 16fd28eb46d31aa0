"""The ledger on a real SQLite file: durability across a killed writer, concurrent reading, schema."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from contextlib import closing
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from server.accounting.ledger import (
    SCHEMA_VERSION,
    EnergyRow,
    Ledger,
    LedgerError,
    RequestRow,
    daily_summary,
    default_ledger_path,
    read_energy,
    read_requests,
)
from tests.support import REPO_ROOT

SAIGON = ZoneInfo("Asia/Ho_Chi_Minh")  # UTC+7, no daylight saving


def request_row(finished_at: float = 1_750_000_000.0, **changes: object) -> RequestRow:
    fields: dict[str, object] = {
        "finished_at": finished_at,
        "route": "/v1/chat/completions",
        "upstream": "http://127.0.0.1:8001",
        "model": "student",
        "stream": True,
        "status": 200,
        "prompt_tokens": 120,
        "completion_tokens": 30,
        "ttft_ms": 12.5,
        "tpot_ms": 3.25,
        "e2e_ms": 110.0,
        "energy_j": 4.5,
        "electricity_cost": 0.00375,
        "currency": "VND",
        "api_cost_usd": {"gpt-4.1": 0.0012, "deepseek-v3.2": 0.000063},
    }
    fields.update(changes)
    return RequestRow(**fields)


def energy_row(ended_at: float = 1_750_000_060.0, **changes: object) -> EnergyRow:
    fields: dict[str, object] = {
        "started_at": ended_at - 60,
        "ended_at": ended_at,
        "status": "ok",
        "source": "nvml",
        "reason": "",
        "total_j": 6000.0,
        "idle_j": 5000.0,
        "attributed_j": 900.0,
        "unattributed_j": 100.0,
        "electricity_cost": 5.0,
        "electricity_cost_usd": 0.0002,
        "currency": "VND",
    }
    fields.update(changes)
    return EnergyRow(**fields)


@pytest.fixture
def ledger(tmp_path: Path):
    opened = Ledger(tmp_path / "data" / "student-serve" / "ledger.sqlite3")
    yield opened
    opened.close()


def test_rows_round_trip(ledger: Ledger) -> None:
    unknowns = request_row(
        1_750_000_001.0, model=None, stream=False, status=499, prompt_tokens=None, completion_tokens=None,
        ttft_ms=None, tpot_ms=None, energy_j=None, electricity_cost=None, api_cost_usd={},
    )  # fmt: skip
    requests = [request_row(), unknowns]
    unmeasured = energy_row(
        1_750_000_120.0, status="unavailable", source="unavailable", reason="no power counters", total_j=None,
        idle_j=None, attributed_j=None, unattributed_j=None, electricity_cost=None, electricity_cost_usd=None,
    )  # fmt: skip
    energies = [energy_row(), unmeasured]
    for row in requests:
        ledger.add_request(row)
    for row in energies:
        ledger.add_energy(row)

    assert ledger.count_requests() == 2
    assert read_requests(ledger.path) == requests
    assert read_energy(ledger.path) == energies
    assert read_requests(ledger.path, since_unix=1_750_000_000.5) == [unknowns]


def test_file_is_created_in_wal_mode_with_a_schema_version(ledger: Ledger) -> None:
    assert ledger.path.is_file()
    with sqlite3.connect(ledger.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_rows_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    first = Ledger(path)
    first.add_request(request_row())
    first.close()
    second = Ledger(path)
    second.add_request(request_row())
    assert second.count_requests() == 2
    second.close()


def test_request_written_just_before_a_sigkill_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    writer = textwrap.dedent(
        """
        import os, signal, sys
        from pathlib import Path
        from server.accounting.ledger import Ledger, RequestRow
        ledger = Ledger(Path(sys.argv[1]))
        ledger.add_request(RequestRow(1750000000.0, "/v1/completions", "http://u", "student", False, 200,
                                      7, 3, None, None, 42.0, None, None, "VND", {"gpt-4.1": 0.0001}))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", writer, str(path)], cwd=REPO_ROOT, env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert path.with_name(path.name + "-wal").exists()  # the row lives in the WAL: no clean close happened

    (row,) = read_requests(path)  # the read-only reader recovers it
    assert (row.route, row.prompt_tokens, row.e2e_ms) == ("/v1/completions", 7, 42.0)
    assert row.api_cost_usd == {"gpt-4.1": 0.0001}
    reopened = Ledger(path)
    assert reopened.count_requests() == 1
    reopened.close()


def test_reading_while_a_writer_holds_the_file(ledger: Ledger) -> None:
    ledger.add_request(request_row())
    other_writer = sqlite3.connect(ledger.path, isolation_level=None)
    try:
        other_writer.execute("BEGIN IMMEDIATE")  # holds the write lock, with an uncommitted row
        other_writer.execute("INSERT INTO requests (finished_at, route, upstream, stream, status, e2e_ms, currency,"
                             " api_cost_usd) VALUES (1, '/x', 'u', 0, 200, 1.0, 'VND', '{}')")  # fmt: skip
        started = time.monotonic()
        assert len(read_requests(ledger.path)) == 1  # committed rows only, without waiting for the lock
        assert [day.requests for day in daily_summary(ledger.path, 0.0, SAIGON)] == [1]
        assert time.monotonic() - started < 2.0
        other_writer.execute("ROLLBACK")
    finally:
        other_writer.close()
    ledger.add_request(request_row())
    assert len(read_requests(ledger.path)) == 2


def test_writes_from_many_threads(ledger: Ledger) -> None:
    def write() -> None:
        for _ in range(50):
            ledger.add_request(request_row())

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ledger.count_requests() == 200


def test_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match=f"schema version {SCHEMA_VERSION + 1}.*upgrade student-serve"):
        Ledger(path)
    with pytest.raises(LedgerError, match="upgrade student-serve"):
        daily_summary(path, 0.0)


def test_other_files_are_not_taken_for_a_ledger(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database, it is a text file of some length" * 20)
    with pytest.raises(LedgerError, match="cannot be opened"):
        Ledger(garbage)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    with pytest.raises(LedgerError, match="not a student-serve ledger"):
        daily_summary(other, 0.0)
    with pytest.raises(LedgerError, match="not a student-serve ledger"):
        Ledger(other)
    with sqlite3.connect(other) as conn:
        assert [name for (name,) in conn.execute("SELECT name FROM sqlite_master")] == ["notes"]


def test_no_column_can_hold_prompt_or_answer_text(ledger: Ledger) -> None:
    with sqlite3.connect(ledger.path) as conn:
        columns = {
            table: [row[1] for row in conn.execute(f"PRAGMA table_info({table})")] for table in ("requests", "energy")
        }
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"requests", "energy"}
    assert set(columns["requests"]) == {
        "id", "finished_at", "route", "upstream", "model", "stream", "status", "prompt_tokens", "completion_tokens",
        "ttft_ms", "tpot_ms", "e2e_ms", "energy_j", "electricity_cost", "currency", "api_cost_usd", "key_name",
        "routed_to", "route_reason", "remote_cost_usd",
    }  # fmt: skip
    for name in columns["requests"] + columns["energy"]:
        assert not any(word in name for word in ("message", "content", "text", "answer", "body")), name
        assert "prompt" not in name or name == "prompt_tokens"


VERSION_1_REQUESTS = """CREATE TABLE requests (
    id INTEGER PRIMARY KEY, finished_at REAL NOT NULL, route TEXT NOT NULL, upstream TEXT NOT NULL, model TEXT,
    stream INTEGER NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER, completion_tokens INTEGER,
    ttft_ms REAL, tpot_ms REAL, e2e_ms REAL NOT NULL, energy_j REAL, electricity_cost REAL, currency TEXT NOT NULL,
    api_cost_usd TEXT NOT NULL)"""
ENERGY_TABLE = """CREATE TABLE energy (
    id INTEGER PRIMARY KEY, started_at REAL NOT NULL, ended_at REAL NOT NULL, status TEXT NOT NULL,
    source TEXT NOT NULL, reason TEXT NOT NULL, total_j REAL, idle_j REAL, attributed_j REAL, unattributed_j REAL,
    electricity_cost REAL, electricity_cost_usd REAL, currency TEXT NOT NULL)"""


def test_a_version_1_ledger_is_read_as_it_is_and_migrated_when_a_gateway_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(VERSION_1_REQUESTS)
        conn.execute(
            "INSERT INTO requests (finished_at, route, upstream, stream, status, e2e_ms, currency, api_cost_usd)"
            " VALUES (1750000000.0, '/v1/completions', 'http://u', 0, 200, 42.0, 'VND', '{}')"
        )
        conn.execute("PRAGMA user_version = 1")
    assert [row.key_name for row in read_requests(path)] == [None]  # `student report` never changes a ledger
    assert [row.routed_to for row in read_requests(path)] == ["local"]
    ledger = Ledger(path)
    ledger.add_request(request_row(1_750_000_001.0, key_name="shop"))
    ledger.close()
    assert [row.key_name for row in read_requests(path)] == [None, "shop"]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    Ledger(path).close()  # migrated once: opening it again changes nothing
    assert read_energy(path) == []  # the energy table it never had was created whole


def test_a_version_2_ledger_gets_the_route_columns_its_rows_were_local(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(VERSION_1_REQUESTS)
        conn.execute("ALTER TABLE requests ADD COLUMN key_name TEXT")  # what version 2 added
        conn.execute(ENERGY_TABLE)
        conn.execute(
            "INSERT INTO requests (finished_at, route, upstream, stream, status, prompt_tokens, completion_tokens,"
            " e2e_ms, energy_j, electricity_cost, currency, api_cost_usd, key_name) VALUES (1750000000.0,"
            " '/v1/chat/completions', 'http://u', 0, 200, 10, 5, 42.0, 3.6, 0.003, 'VND', '{}', 'shop')"
        )
        conn.execute("PRAGMA user_version = 2")
    (old,) = read_requests(path)  # read as it is, not migrated
    assert (old.key_name, old.routed_to, old.route_reason, old.remote_cost_usd) == ("shop", "local", None, None)
    (day,) = daily_summary(path, 0.0, SAIGON)
    assert set(day.routes) == {"local"} and day.routes["local"].electricity_cost == {"VND": 0.003}
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2

    ledger = Ledger(path)
    remote = request_row(
        1_750_000_001.0, upstream="https://api.example", energy_j=None, electricity_cost=None,
        routed_to="remote", route_reason="keyword:tại sao", remote_cost_usd=0.00125,
    )  # fmt: skip
    ledger.add_request(remote)
    ledger.close()
    assert read_requests(path) == [old, remote]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT routed_to FROM requests ORDER BY id").fetchall() == [("local",), ("remote",)]


def test_days_are_split_by_route_with_each_routes_own_cost(ledger: Ledger) -> None:
    base = 1_750_000_000.0  # 22:06 in Saigon; all rows below fall on that day
    ledger.add_request(request_row(base, electricity_cost=0.5, routed_to="local", route_reason="default"))
    ledger.add_request(request_row(base + 1, energy_j=None, electricity_cost=None, status=503))
    for offset, cost in ((2, 0.25), (3, 0.125)):
        ledger.add_request(
            request_row(base + offset, energy_j=None, electricity_cost=None, prompt_tokens=100, completion_tokens=50,
                        routed_to="remote", route_reason="model", remote_cost_usd=cost)
        )  # fmt: skip
    (day,) = daily_summary(ledger.path, 0.0, SAIGON)
    local, remote = day.routes["local"], day.routes["remote"]
    assert (local.requests, local.errors, local.prompt_tokens, local.completion_tokens) == (2, 1, 240, 60)
    assert local.electricity_cost == {"VND": 0.5} and local.remote_cost_usd == 0.0
    assert (remote.requests, remote.errors, remote.prompt_tokens, remote.completion_tokens) == (2, 0, 200, 100)
    assert remote.electricity_cost == {} and remote.remote_cost_usd == 0.375
    assert day.remote_cost_usd == 0.375 and day.requests == local.requests + remote.requests


def test_missing_ledger_is_a_clear_error_and_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "ledger.sqlite3"
    with pytest.raises(LedgerError, match=r"no ledger at .*: start `student serve` first, or pass --ledger"):
        daily_summary(path, 0.0)
    assert not path.parent.exists()


def test_default_path_follows_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_ledger_path() == tmp_path / "student-serve" / "ledger.sqlite3"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_ledger_path() == Path.home() / ".local" / "share" / "student-serve" / "ledger.sqlite3"


def _at(day: date, hour: int, minute: int = 0, tz: ZoneInfo = SAIGON) -> float:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=tz).timestamp()


def test_daily_summary_groups_by_local_day(ledger: Ledger) -> None:
    day = date(2025, 6, 1)
    ledger.add_request(request_row(_at(day, 23, 30), prompt_tokens=100, completion_tokens=10))
    ledger.add_request(request_row(_at(day, 6), status=404, prompt_tokens=None, completion_tokens=None))
    # 00:30 in Saigon is still the previous day in UTC: it must count on 2 June here.
    ledger.add_request(request_row(_at(date(2025, 6, 2), 0, 30), status=499, prompt_tokens=50, completion_tokens=5))
    ledger.add_energy(energy_row(_at(day, 12), total_j=3.6e6, idle_j=3.0e6, attributed_j=0.5e6,
                                 electricity_cost=3000.0, electricity_cost_usd=0.12))  # fmt: skip
    ledger.add_energy(energy_row(_at(date(2025, 6, 2), 1), status="unavailable", reason="NVML: no GPU", total_j=None,
                                 electricity_cost=None, electricity_cost_usd=None))  # fmt: skip
    ledger.add_request(request_row(_at(date(2025, 5, 20), 12)))  # before the window

    first, second = daily_summary(ledger.path, _at(day, 0), SAIGON)

    assert (first.day, first.requests, first.errors) == (day, 2, 1)
    assert (first.prompt_tokens, first.completion_tokens) == (100, 10)
    assert (first.total_j, first.idle_j, first.attributed_j, first.measured_s) == (3.6e6, 3.0e6, 0.5e6, 60.0)
    assert first.electricity_cost == {"VND": 3000.0} and first.electricity_cost_usd == pytest.approx(0.12)
    assert first.api_cost_usd == pytest.approx({"gpt-4.1": 0.0024, "deepseek-v3.2": 0.000126})
    assert first.energy_status == "ok" and first.energy_reasons == ()

    assert (second.day, second.requests, second.errors) == (date(2025, 6, 2), 1, 1)
    assert second.total_j is None and second.electricity_cost_usd is None
    assert second.energy_status == "unavailable" and second.energy_reasons == ("NVML: no GPU",)


def test_daily_summary_uses_the_machine_time_zone_by_default(ledger: Ledger) -> None:
    ledger.add_request(request_row(_at(date(2025, 6, 2), 0, 30)))  # 1 June 17:30 UTC
    old = os.environ.get("TZ")
    try:
        os.environ["TZ"] = "Asia/Ho_Chi_Minh"
        time.tzset()
        (in_saigon,) = daily_summary(ledger.path, 0.0)
        os.environ["TZ"] = "UTC"
        time.tzset()
        (in_utc,) = daily_summary(ledger.path, 0.0)
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()
    assert (in_saigon.day, in_utc.day) == (date(2025, 6, 2), date(2025, 6, 1))


def test_requests_without_any_energy_reading_say_why(ledger: Ledger) -> None:
    ledger.add_request(request_row())
    (day,) = daily_summary(ledger.path, 0.0, SAIGON)
    assert day.total_j is None and day.energy_status == "unavailable"
    assert day.energy_reasons and "no energy readings" in day.energy_reasons[0]


def test_a_version_3_ledger_gets_the_replica_column_its_energy_rows_were_this_hosts(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(VERSION_1_REQUESTS)
        for column in (
            "key_name TEXT",
            "routed_to TEXT NOT NULL DEFAULT 'local'",
            "route_reason TEXT",
            "remote_cost_usd REAL",
        ):  # what versions 2 and 3 added
            conn.execute(f"ALTER TABLE requests ADD COLUMN {column}")
        conn.execute(ENERGY_TABLE)
        conn.execute(
            "INSERT INTO energy (started_at, ended_at, status, source, reason, total_j, idle_j, attributed_j,"
            " unattributed_j, electricity_cost, electricity_cost_usd, currency) VALUES (1749999940.0, 1750000000.0,"
            " 'ok', 'nvml', 'NVML, 1 GPU(s) [0], energy counter', 600.0, 500.0, 90.0, 10.0, 0.5, 0.00002, 'VND')"
        )
        conn.execute("PRAGMA user_version = 3")
    (old,) = read_energy(path)  # read as it is: the row was this host's
    assert (old.replica, old.total_j) == (None, 600.0)
    (day,) = daily_summary(path, 0.0, SAIGON)
    assert list(day.replicas) == [None] and day.replicas[None].total_j == 600.0

    ledger = Ledger(path)
    remote = energy_row(1_750_000_060.0, source="dcgm", reason="DCGM exporter http://gpu1:9400/metrics, GPU 0",
                        replica="http://gpu1:8001")  # fmt: skip
    ledger.add_energy(remote)
    ledger.close()
    assert read_energy(path) == [old, remote]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


def test_each_replicas_energy_is_its_own_and_the_day_is_their_sum(ledger: Ledger) -> None:
    day = date(2025, 6, 1)
    gpu1, gpu2 = "http://gpu1:8001", "http://gpu2:8001"
    down = "DCGM exporter http://gpu2:9400/metrics unreachable: connection refused"
    ledger.add_energy(
        energy_row(
            _at(day, 12),
            total_j=3.6e6,
            idle_j=3.0e6,
            attributed_j=0.5e6,
            electricity_cost=3000.0,
            electricity_cost_usd=0.12,
            source="dcgm",
            replica=gpu1,
        )
    )
    ledger.add_energy(
        energy_row(
            _at(day, 12, 1),
            total_j=1.8e6,
            idle_j=1.0e6,
            attributed_j=0.7e6,
            electricity_cost=1500.0,
            electricity_cost_usd=0.06,
            source="dcgm",
            replica=gpu2,
        )
    )
    ledger.add_energy(energy_row(_at(day, 12, 2), status="unavailable", source="dcgm", total_j=None, idle_j=None,
                                 attributed_j=None, unattributed_j=None, electricity_cost=None,
                                 electricity_cost_usd=None, replica=gpu2, reason=down))  # fmt: skip

    (summary,) = daily_summary(ledger.path, _at(day, 0), SAIGON)

    assert set(summary.replicas) == {gpu1, gpu2}
    first, second = summary.replicas[gpu1], summary.replicas[gpu2]
    assert (first.total_j, first.attributed_j, first.energy_status, first.energy_reasons) == (3.6e6, 0.5e6, "ok", ())
    assert (second.total_j, second.measured_s, second.unmeasured_s) == (1.8e6, 60.0, 60.0)
    assert second.energy_status == "partial"
    assert second.energy_reasons == (down,)
    assert second.electricity_cost == {"VND": 1500.0} and second.electricity_cost_usd == pytest.approx(0.06)
    assert (summary.total_j, summary.idle_j, summary.attributed_j) == (5.4e6, 4.0e6, 1.2e6)
    assert summary.electricity_cost == {"VND": 4500.0} and summary.electricity_cost_usd == pytest.approx(0.18)
    assert (summary.measured_s, summary.unmeasured_s, summary.energy_status) == (60.0, 60.0, "partial")
    assert summary.energy_reasons == (f"{gpu2}: {down}",)
