"""The accounting ledger: one SQLite file, one row per finished request and per energy window.

Why SQLite, and why this way:

* Every finished request is committed before its response's last bytes go out, so a killed
  gateway (even SIGKILL) never loses a request the client saw finish.
* WAL journal with `synchronous=NORMAL`: a commit is an append to the `-wal` file without an
  fsync (microseconds, fine on the event loop). That survives a process kill, because the
  operating system still has the bytes, but NOT a power cut or kernel crash, which may lose the
  last commits (never corrupt the file). `synchronous=FULL` would add an fsync per request.
* WAL also lets `student report` read while the gateway writes; `busy_timeout` (5 s) covers the
  brief moments a checkpoint holds a lock.
* Energy rows hold the meter's whole increase over a window, idle included, so the ledger
  accounts for every joule measured, not only the part attributed to requests. With several
  meters (replicas read through their hosts' DCGM exporters) each writes its own rows, naming
  its replica; a row without one is this gateway host's own devices (NVML, RAPL).
* No prompt or answer text is ever stored: those are customers' messages. Only counts, times
  and money.

`PRAGMA user_version` is the schema version; opening an older ledger for writing migrates it
(version 2 added `requests.key_name`, NULL in older rows; version 3 the hybrid route: `routed_to`,
'local' in older rows, `route_reason` and `remote_cost_usd`, NULL; version 4 `energy.replica`, the
replica whose own exporter measured the row, NULL for this host's devices, as every older row
was). Times are unix seconds (`time.time()`), energies joules, costs in the row's `currency`
unless named `_usd`.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, tzinfo
from pathlib import Path

__all__ = [
    "SCHEMA_VERSION",
    "DaySummary",
    "EnergyDay",
    "EnergyRow",
    "Ledger",
    "LedgerError",
    "RequestRow",
    "RouteDay",
    "daily_summary",
    "default_ledger_path",
    "read_energy",
    "read_requests",
]

SCHEMA_VERSION = 4
BUSY_TIMEOUT_MS = 5000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    finished_at REAL NOT NULL,
    route TEXT NOT NULL,
    upstream TEXT NOT NULL,
    model TEXT,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    ttft_ms REAL,
    tpot_ms REAL,
    e2e_ms REAL NOT NULL,
    energy_j REAL,
    electricity_cost REAL,
    currency TEXT NOT NULL,
    api_cost_usd TEXT NOT NULL,
    key_name TEXT,
    routed_to TEXT NOT NULL DEFAULT 'local',
    route_reason TEXT,
    remote_cost_usd REAL
);
CREATE INDEX IF NOT EXISTS requests_finished_at ON requests (finished_at);
CREATE TABLE IF NOT EXISTS energy (
    id INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    total_j REAL,
    idle_j REAL,
    attributed_j REAL,
    unattributed_j REAL,
    electricity_cost REAL,
    electricity_cost_usd REAL,
    currency TEXT NOT NULL,
    replica TEXT
);
CREATE INDEX IF NOT EXISTS energy_ended_at ON energy (ended_at);
"""

_REQUEST_COLUMNS = (
    "finished_at", "route", "upstream", "model", "stream", "status", "prompt_tokens", "completion_tokens",
    "ttft_ms", "tpot_ms", "e2e_ms", "energy_j", "electricity_cost", "currency", "api_cost_usd", "key_name",
    "routed_to", "route_reason", "remote_cost_usd",
)  # fmt: skip
# From version N to N + 1 (a ledger is never rewritten: columns are only added).
_MIGRATIONS = {
    1: ("ALTER TABLE requests ADD COLUMN key_name TEXT",),
    2: (
        "ALTER TABLE requests ADD COLUMN routed_to TEXT NOT NULL DEFAULT 'local'",
        "ALTER TABLE requests ADD COLUMN route_reason TEXT",
        "ALTER TABLE requests ADD COLUMN remote_cost_usd REAL",
    ),
    3: ("ALTER TABLE energy ADD COLUMN replica TEXT",),
}
# What an older ledger, read as it is (`student report` never migrates), has instead of the
# columns added since: the SQL for the value, by the version that added the column.
_ADDED_COLUMNS = {
    "key_name": (2, "NULL"),
    "routed_to": (3, "'local'"),
    "route_reason": (3, "NULL"),
    "remote_cost_usd": (3, "NULL"),
}
_ADDED_ENERGY_COLUMNS = {"replica": (4, "NULL")}
_ENERGY_COLUMNS = (
    "started_at", "ended_at", "status", "source", "reason", "total_j", "idle_j", "attributed_j",
    "unattributed_j", "electricity_cost", "electricity_cost_usd", "currency", "replica",
)  # fmt: skip


class LedgerError(Exception):
    """A ledger the user can fix: missing, not a ledger, or written by a newer student-serve."""


def default_ledger_path() -> Path:
    """`$XDG_DATA_HOME/student-serve/ledger.sqlite3`, else under ~/.local/share."""
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "student-serve" / "ledger.sqlite3"


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One finished request: what it cost in time, tokens, energy and money (no text)."""

    finished_at: float  # unix seconds (time.time())
    route: str  # e.g. "/v1/chat/completions"
    upstream: str  # base URL that served it
    model: str | None
    stream: bool
    status: int  # HTTP status sent to the client (499 = client went away)
    prompt_tokens: int | None
    completion_tokens: int | None
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float
    energy_j: float | None  # None when energy is not measured (never 0 for "unknown")
    electricity_cost: float | None  # in `currency`, includes the wall-power factor
    currency: str  # e.g. "VND"
    api_cost_usd: Mapping[str, float]  # per hosted API, USD; stored as JSON text
    key_name: str | None = None  # the API key's name (never the key); None without keys or before version 2
    routed_to: str = "local"  # "local" (the student) or "remote" (the hybrid route's remote API)
    route_reason: str | None = None  # why (server/control/hybrid_routing.py); None without a remote
    remote_cost_usd: float | None = None  # remote requests: tokens × the remote's price; None for local ones


@dataclass(frozen=True, slots=True)
class EnergyRow:
    """Energy measured over [started_at, ended_at]: the meter's cumulative totals' increase, so
    idle energy (not attributed to any request) is in the ledger too."""

    started_at: float  # unix seconds
    ended_at: float  # unix seconds
    status: str  # "ok" | "unavailable"
    source: str  # e.g. "nvml", "rapl", "unavailable"
    reason: str
    total_j: float | None
    idle_j: float | None
    attributed_j: float | None
    unattributed_j: float | None
    electricity_cost: float | None  # cost of total_j in `currency` (with the wall factor)
    electricity_cost_usd: float | None
    currency: str
    replica: str | None = None  # the replica whose own exporter measured it; None: this host's devices


class Ledger:
    """The gateway's writing end: opens (or creates) the file and appends rows, one commit each.

    Safe to share between threads: one connection, a lock around every use of it.
    """

    def __init__(self, path: Path):
        self._path = Path(path)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: autocommit, so each INSERT is its own committed transaction.
            self._conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise LedgerError(f"ledger {self._path} cannot be opened: {exc}") from None
        try:
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"ledger {self._path}: cannot use WAL journal mode (got {mode!r})")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._create_schema()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise LedgerError(f"ledger {self._path} cannot be opened: {exc}") from None
        except BaseException:
            self._conn.close()
            raise

    def _create_schema(self) -> None:
        """Create the tables once, or migrate an older ledger (BEGIN IMMEDIATE: two starting
        processes cannot race)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(self._conn, self._path)
            if version == 0:
                tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if tables - {"requests", "energy"}:
                    raise LedgerError(f"{self._path} is a database but not a student-serve ledger: pick another path")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            else:
                tables = {name for (name,) in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                for older in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[older]:
                        if statement.split()[2] in tables:  # ALTER TABLE <name> ...: a missing table comes whole below
                            self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version = {older + 1}")
                for statement in _SCHEMA.split(";"):  # tables (and indexes) an older ledger never had
                    if statement.strip():
                        self._conn.execute(statement)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    @property
    def path(self) -> Path:
        return self._path

    def add_request(self, row: RequestRow) -> None:
        """Append one finished request and commit (survives a kill of this process once returned)."""
        values = (
            row.finished_at, row.route, row.upstream, row.model, int(row.stream), row.status,
            row.prompt_tokens, row.completion_tokens, row.ttft_ms, row.tpot_ms, row.e2e_ms, row.energy_j,
            row.electricity_cost, row.currency,
            json.dumps(dict(row.api_cost_usd), sort_keys=True, allow_nan=False), row.key_name,
            row.routed_to, row.route_reason, row.remote_cost_usd,
        )  # fmt: skip
        self._insert("requests", _REQUEST_COLUMNS, values)

    def add_energy(self, row: EnergyRow) -> None:
        """Append one energy window and commit."""
        values = tuple(getattr(row, name) for name in _ENERGY_COLUMNS)
        self._insert("energy", _ENERGY_COLUMNS, values)

    def _insert(self, table: str, columns: tuple[str, ...], values: tuple[object, ...]) -> None:
        sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        with self._lock:
            self._conn.execute(sql, values)

    def count_requests(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def close(self) -> None:
        """Close the connection (the last one to close folds the WAL back into the file)."""
        with self._lock:
            self._conn.close()


def _user_version(conn: sqlite3.Connection, path: Path) -> int:
    """The file's schema version; a newer one than this code knows is an error, not a guess."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger {path} has schema version {version}, newer than this student-serve "
            f"understands ({SCHEMA_VERSION}): upgrade student-serve to read it"
        )
    return version


# --- reading (for `student report`) --------------------------------------------------------


@contextmanager
def _read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection: reporting can never change or create a ledger."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise LedgerError(f"no ledger at {path}: start `student serve` first, or pass --ledger")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise LedgerError(f"ledger {path} cannot be opened: {exc}") from None
    with closing(conn):
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if _user_version(conn, path) == 0:
                raise LedgerError(f"{path} is not a student-serve ledger (no schema version)")
            yield conn
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {path} cannot be read: {exc}") from None


def read_requests(path: Path, since_unix: float = -math.inf, until_unix: float = math.inf) -> list[RequestRow]:
    """Requests finished in [since_unix, until_unix), oldest first."""
    with _read_only(path) as conn:
        columns = _request_columns(conn)
        cursor = conn.execute(
            f"SELECT {', '.join(columns)} FROM requests"
            " WHERE finished_at >= ? AND finished_at < ? ORDER BY finished_at, id",
            (since_unix, until_unix),
        )
        return [_request_row(values) for values in cursor]


def _request_columns(conn: sqlite3.Connection) -> list[str]:
    """The request columns to select: a ledger no gateway has migrated yet lacks the newer ones."""
    return _columns(conn, _REQUEST_COLUMNS, _ADDED_COLUMNS)


def _energy_columns(conn: sqlite3.Connection) -> list[str]:
    """The energy columns to select, the same way."""
    return _columns(conn, _ENERGY_COLUMNS, _ADDED_ENERGY_COLUMNS)


def _columns(conn: sqlite3.Connection, names: tuple[str, ...], added: Mapping[str, tuple[int, str]]) -> list[str]:
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    return [added[name][1] if name in added and version < added[name][0] else name for name in names]


def _request_row(values: tuple[object, ...]) -> RequestRow:
    fields = dict(zip(_REQUEST_COLUMNS, values, strict=True))
    fields["stream"] = bool(fields["stream"])
    fields["api_cost_usd"] = json.loads(str(fields["api_cost_usd"]))
    return RequestRow(**fields)  # type: ignore[arg-type]  # sqlite3 gives objects; the columns are the row's fields


def read_energy(path: Path, since_unix: float = -math.inf, until_unix: float = math.inf) -> list[EnergyRow]:
    """Energy windows that ended in [since_unix, until_unix), oldest first."""
    with _read_only(path) as conn:
        cursor = conn.execute(
            f"SELECT {', '.join(_energy_columns(conn))} FROM energy"
            " WHERE ended_at >= ? AND ended_at < ? ORDER BY ended_at, id",
            (since_unix, until_unix),
        )
        return [EnergyRow(*values) for values in cursor]


@dataclass(frozen=True, slots=True)
class RouteDay:
    """One route's requests on one day (hybrid routing): counts, tokens and their own cost."""

    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    # The electricity of the energy attributed to its requests (idle not included), per currency;
    # empty when none of them was measured (a remote request never is).
    electricity_cost: dict[str, float]
    remote_cost_usd: float  # remote requests: tokens × the remote's price


@dataclass(frozen=True, slots=True)
class EnergyDay:
    """One meter's energy windows on one day (a replica with its own exporter, or this host's
    devices). The energy fields cover the "ok" windows only; None when none of them was measured
    (never 0 for "unknown"), and `energy_reasons` says why."""

    total_j: float | None
    idle_j: float | None
    attributed_j: float | None
    measured_s: float  # seconds covered by its "ok" windows
    unmeasured_s: float  # seconds covered by its "unavailable" windows
    electricity_cost: dict[str, float]  # of total_j, per currency
    electricity_cost_usd: float | None
    energy_reasons: tuple[str, ...]

    @property
    def energy_status(self) -> str:
        """ "ok", "partial" (some windows unmeasured) or "unavailable"."""
        if self.total_j is None:
            return "unavailable"
        return "partial" if self.unmeasured_s > 0 else "ok"


@dataclass(frozen=True, slots=True)
class DaySummary:
    """One local calendar day of the ledger.

    A request counts on the day it finished, an energy window on the day it ended. The energy
    fields cover only the "ok" windows, summed over every meter; they are None when no window of
    the day was measured (never 0 for "unknown"). `energy_reasons` says why energy was missing,
    where it was (naming the replica, for a replica's own meter). `measured_s` and
    `unmeasured_s` are the longest any one meter had, not their sum. `replicas`: each meter's own
    day, by replica URL (None: this host's devices).
    """

    day: date
    requests: int
    errors: int  # status >= 400, including 499 (client went away)
    prompt_tokens: int
    completion_tokens: int
    api_cost_usd: dict[str, float]  # per hosted API: what the same tokens would have cost
    total_j: float | None  # everything the meter measured, idle included
    idle_j: float | None
    attributed_j: float | None  # the part attributed to requests
    measured_s: float  # seconds covered by "ok" energy windows
    unmeasured_s: float  # seconds covered by "unavailable" energy windows
    electricity_cost: dict[str, float]  # of total_j, per currency (one, unless the tariff changed)
    electricity_cost_usd: float | None
    energy_reasons: tuple[str, ...]
    routes: Mapping[str, RouteDay] = field(default_factory=dict)  # "local", "remote": those with requests
    replicas: Mapping[str | None, EnergyDay] = field(default_factory=dict)  # each meter's energy

    @property
    def remote_cost_usd(self) -> float:
        """What the day's remote requests cost (USD; 0 without any)."""
        return sum(route.remote_cost_usd for route in self.routes.values())

    @property
    def energy_status(self) -> str:
        """ "ok", "partial" (some of the day's windows unmeasured) or "unavailable"."""
        if self.total_j is None:
            return "unavailable"
        return "partial" if self.unmeasured_s > 0 else "ok"


NO_ENERGY_ROWS = "no energy readings recorded (the gateway was not running long enough to write one)"


def daily_summary(db_path: Path, since_unix: float, tz: tzinfo | None = None) -> list[DaySummary]:
    """Per local calendar day (in `tz`; None: this machine's local time), from `since_unix` on.

    Days with neither requests nor energy windows are left out. Sums are done by SQLite over
    each day's range of the time index, so a long ledger is not pulled into Python.
    """
    with _read_only(db_path) as conn:
        first, last = _span(conn, since_unix)
        if first is None or last is None:
            return []
        columns = dict(zip(_REQUEST_COLUMNS, _request_columns(conn), strict=True))
        columns["replica"] = dict(zip(_ENERGY_COLUMNS, _energy_columns(conn), strict=True))["replica"]
        days = []
        day, last_day = _local_day(first, tz), _local_day(last, tz)
        while day <= last_day:
            start = max(since_unix, _day_start_unix(day, tz))
            end = _day_start_unix(day + timedelta(days=1), tz)
            summary = _summarise_day(conn, day, start, end, columns)
            if summary is not None:
                days.append(summary)
            day += timedelta(days=1)
        return days


def _span(conn: sqlite3.Connection, since_unix: float) -> tuple[float | None, float | None]:
    """Earliest and latest time of any row at or after `since_unix`."""
    low, high = conn.execute(
        "SELECT MIN(t), MAX(t) FROM ("
        " SELECT MIN(finished_at) AS t FROM requests WHERE finished_at >= :since"
        " UNION ALL SELECT MAX(finished_at) FROM requests WHERE finished_at >= :since"
        " UNION ALL SELECT MIN(ended_at) FROM energy WHERE ended_at >= :since"
        " UNION ALL SELECT MAX(ended_at) FROM energy WHERE ended_at >= :since)",
        {"since": since_unix},
    ).fetchone()
    return low, high


def _local_day(unix_s: float, tz: tzinfo | None) -> date:
    return datetime.fromtimestamp(unix_s, tz).date()


def _day_start_unix(day: date, tz: tzinfo | None) -> float:
    """Unix seconds of local midnight starting `day` (naive datetime: the machine's local time)."""
    return datetime.combine(day, time(), tzinfo=tz).timestamp()


def _summarise_day(
    conn: sqlite3.Connection, day: date, start: float, end: float, columns: Mapping[str, str]
) -> DaySummary | None:
    """Sums for [start, end); None when the day has no rows at all. `columns`: request column
    name -> the SQL to read it (a constant for a column an unmigrated ledger lacks)."""
    window = {"start": start, "end": end}
    requests, errors, prompt_tokens, completion_tokens = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(status >= 400), 0), COALESCE(SUM(prompt_tokens), 0),"
        " COALESCE(SUM(completion_tokens), 0) FROM requests WHERE finished_at >= :start AND finished_at < :end",
        window,
    ).fetchone()
    api_cost_usd = dict(
        conn.execute(
            "SELECT cost.key, TOTAL(cost.value) FROM requests, json_each(requests.api_cost_usd) AS cost"
            " WHERE finished_at >= :start AND finished_at < :end GROUP BY cost.key ORDER BY cost.key",
            window,
        ).fetchall()
    )
    energy = conn.execute(
        f"SELECT {columns['replica']}, status, currency, TOTAL(total_j), TOTAL(idle_j), TOTAL(attributed_j),"
        " TOTAL(electricity_cost), SUM(electricity_cost_usd), TOTAL(ended_at - started_at)"
        " FROM energy WHERE ended_at >= :start AND ended_at < :end GROUP BY 1, 2, 3",
        window,
    ).fetchall()
    groups = [(row[0], _EnergyGroup(*row[1:])) for row in energy]
    if requests == 0 and not energy:
        return None
    reasons: dict[str | None, list[str]] = {}
    for replica, reason in conn.execute(
        f"SELECT {columns['replica']}, reason FROM energy WHERE status != 'ok' AND ended_at >= :start"
        " AND ended_at < :end GROUP BY 1, 2 ORDER BY MIN(ended_at)",
        window,
    ):
        reasons.setdefault(replica, []).append(reason)
    replicas = {
        replica: _energy_day([group for key, group in groups if key == replica], reasons.get(replica, []))
        for replica in dict.fromkeys(key for key, _ in groups)
    }
    whole = _energy_day([group for _, group in groups], [])
    day_reasons = [
        reason if replica is None else f"{replica}: {reason}" for replica, found in reasons.items() for reason in found
    ]
    if not energy:
        day_reasons.append(NO_ENERGY_ROWS)
    return DaySummary(
        day=day,
        requests=int(requests),
        errors=int(errors),
        prompt_tokens=int(prompt_tokens),
        completion_tokens=int(completion_tokens),
        api_cost_usd=api_cost_usd,
        total_j=whole.total_j,
        idle_j=whole.idle_j,
        attributed_j=whole.attributed_j,
        measured_s=max((part.measured_s for part in replicas.values()), default=0.0),
        unmeasured_s=max((part.unmeasured_s for part in replicas.values()), default=0.0),
        electricity_cost=whole.electricity_cost,
        electricity_cost_usd=whole.electricity_cost_usd,
        energy_reasons=tuple(day_reasons),
        routes=_route_days(conn, window, columns),
        replicas=replicas,
    )


@dataclass(frozen=True, slots=True)
class _EnergyGroup:
    """The sums of one meter's energy rows of one status and currency over a day."""

    status: str
    currency: str
    total_j: float
    idle_j: float
    attributed_j: float
    electricity_cost: float
    electricity_cost_usd: float | None  # NULL only when every row's was
    seconds: float


def _energy_day(groups: list[_EnergyGroup], reasons: list[str]) -> EnergyDay:
    """A day from its groups of energy rows: the "ok" ones measured, the rest not."""
    ok = [group for group in groups if group.status == "ok"]
    electricity_cost: dict[str, float] = {}
    for group in ok:
        electricity_cost[group.currency] = electricity_cost.get(group.currency, 0.0) + group.electricity_cost
    costs_usd = [group.electricity_cost_usd for group in ok]
    return EnergyDay(
        total_j=sum(group.total_j for group in ok) if ok else None,
        idle_j=sum(group.idle_j for group in ok) if ok else None,
        attributed_j=sum(group.attributed_j for group in ok) if ok else None,
        measured_s=sum(group.seconds for group in ok),
        unmeasured_s=sum(group.seconds for group in groups if group.status != "ok"),
        electricity_cost=electricity_cost,
        electricity_cost_usd=sum(c for c in costs_usd if c is not None) if ok and None not in costs_usd else None,
        energy_reasons=tuple(reasons),
    )


def _route_days(
    conn: sqlite3.Connection, window: Mapping[str, float], columns: Mapping[str, str]
) -> dict[str, RouteDay]:
    found: dict[str, RouteDay] = {}
    for route, currency, requests, errors, prompt, completion, electricity, measured, remote in conn.execute(
        f"SELECT {columns['routed_to']}, currency, COUNT(*), COALESCE(SUM(status >= 400), 0),"
        " COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), TOTAL(electricity_cost),"
        f" COUNT(electricity_cost), TOTAL({columns['remote_cost_usd']}) FROM requests"
        " WHERE finished_at >= :start AND finished_at < :end GROUP BY 1, 2 ORDER BY 1, 2",
        window,
    ):
        before = found.get(route, RouteDay(0, 0, 0, 0, {}, 0.0))
        cost = dict(before.electricity_cost)
        if measured:
            cost[currency] = cost.get(currency, 0.0) + electricity
        found[route] = RouteDay(
            before.requests + requests,
            before.errors + errors,
            before.prompt_tokens + prompt,
            before.completion_tokens + completion,
            cost,
            before.remote_cost_usd + remote,
        )
    return found
