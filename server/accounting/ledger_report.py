"""`student report`: per local day, what the student served and what it cost, against hosted APIs.

It only reads the ledger (a read-only SQLite connection), so it works while the gateway is
running, after restarts and after crashes. Reading is in `server.accounting.ledger`; this module turns the
daily sums into one report and renders it as a table (for people), JSON or CSV (for tools).

Money: electricity is the energy rows' cost (all measured energy, idle included, with the
wall-power factor) in their currency; with hybrid routing, requests sent to the remote API cost
their tokens × its price (USD). The saving against an API is that API's price for all the
tokens minus the electricity and the remote's cost, in USD. Per route (local, remote): requests,
tokens, and the route's own cost: local the electricity of the energy attributed to its requests
(idle not included), remote the API's charge. Energy that was not measured is shown as
"unavailable" with the reason, never as 0.

Per replica: where replicas are measured through their own hosts' DCGM exporters, each one's
energy (and this host's own devices, for the replicas without one) is shown apart too, with its
status and why it was not measured; the day's figures are their sum.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, TextIO
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from server.accounting.energy_units import kwh
from server.accounting.ledger import (
    DaySummary,
    EnergyDay,
    LedgerError,
    RouteDay,
    daily_summary,
    default_ledger_path,
)
from server.telemetry.energy_attribution import THIS_HOST

UNAVAILABLE = "unavailable"
NOTHING_IN_WINDOW = "no requests or energy readings in this window"
MAX_WINDOW_DAYS = 36_500  # beyond this, dates stop being representable; no ledger is that old
ROUTES = ("local", "remote")
_SINCE = re.compile(r"(?P<count>\d+)\s*(?P<unit>[hd])")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ledger",
        type=Path,
        metavar="PATH",
        help="ledger file (default: $STUDENT_LEDGER_PATH, else the one `student serve` writes)",
    )
    parser.add_argument(
        "--since", default="7d", metavar="WINDOW", help="how far back: 24h, 7d, 30d, or any <N>h / <N>d (default 7d)"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the report as one JSON object")
    output.add_argument("--csv", metavar="FILE", help="write the daily rows as CSV to FILE ('-': stdout)")
    parser.add_argument(
        "--usd-rate",
        type=float,
        metavar="RATE",
        help="electricity currency units per USD for the savings (default: the rate stored with each energy reading)",
    )
    parser.add_argument(
        "--tz", metavar="ZONE", help="time zone of the days, e.g. Asia/Ho_Chi_Minh (default: this machine's)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        window = parse_since(args.since)
        tz = _time_zone(args.tz)
        if args.usd_rate is not None and not args.usd_rate > 0:
            raise ValueError(f"--usd-rate must be above 0, got {args.usd_rate}")
        path = args.ledger or ledger_path_from_env()
        since_unix = time.time() - window.total_seconds()
        days = daily_summary(path, since_unix, tz)
    except (ValueError, LedgerError) as exc:
        print(f"student report: {exc}", file=sys.stderr)
        return 1
    report = build_report(days, usd_rate=args.usd_rate)
    since = datetime.fromtimestamp(since_unix, tz).astimezone(tz)
    if args.json:
        document = report_json(report, ledger=path, since=since, window=args.since.strip())
        print(json.dumps(document, indent=2, ensure_ascii=False))
    elif args.csv:
        if args.csv == "-":
            write_csv(report, sys.stdout)
        else:
            try:
                with open(args.csv, "w", newline="", encoding="utf-8") as file:
                    write_csv(report, file)
            except OSError as exc:
                print(f"student report: cannot write {args.csv}: {exc.strerror or exc}", file=sys.stderr)
                return 1
            print(f"student report: wrote {len(report.days)} day(s) to {args.csv}", file=sys.stderr)
    else:
        print(render_text(report, ledger=path, since=since, window=args.since.strip()))
    return 0


def parse_since(text: str) -> timedelta:
    """`24h`, `7d`, `<N>h`, `<N>d` (1 h to 100 years) → the length of the window ending now."""
    match = _SINCE.fullmatch(text.strip().lower())
    if match is None or int(match["count"]) < 1:
        raise ValueError(f"--since {text!r}: expected a number of hours or days, such as 24h, 7d or 30d")
    hours = int(match["count"]) * (1 if match["unit"] == "h" else 24)
    if hours > MAX_WINDOW_DAYS * 24:
        raise ValueError(f"--since {text!r}: at most {MAX_WINDOW_DAYS}d")
    return timedelta(hours=hours)


def ledger_path_from_env() -> Path:
    """`$STUDENT_LEDGER_PATH` (what `student serve` reads too), else the default location."""
    configured = os.environ.get("STUDENT_LEDGER_PATH")
    return Path(configured).expanduser() if configured else default_ledger_path()


def _time_zone(name: str | None) -> tzinfo | None:
    if name is None:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"--tz {name!r}: unknown time zone (use a name like Asia/Ho_Chi_Minh or UTC)") from None


# --- the report: pure data ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RouteLine:
    """One route's part of a report line. `cost_usd`: local, the electricity of the energy
    attributed to its requests (None: not measured or not convertible); remote, the API's charge."""

    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    electricity_cost: float | None  # in Report.currency; None for remote (none used) or unmeasured
    cost_usd: float | None


@dataclass(frozen=True, slots=True)
class ReplicaLine:
    """One meter's energy in a report line: a replica read through its own exporter, or this
    host's devices (`THIS_HOST`). None: not measured, or not convertible."""

    energy_status: str  # "ok" | "partial" | "unavailable"
    energy_kwh: float | None
    attributed_kwh: float | None
    energy_measured_s: float
    electricity_cost: float | None  # in Report.currency
    electricity_cost_usd: float | None
    energy_reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Line:
    """One row of the report: a day, or the total (`label` "TOTAL"). None: not known."""

    label: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    energy_status: str  # "ok" | "partial" | "unavailable"
    energy_kwh: float | None  # all measured energy, idle included
    attributed_kwh: float | None  # the part attributed to requests
    energy_measured_s: float
    electricity_cost: float | None  # in Report.currency
    electricity_cost_usd: float | None
    api_cost_usd: dict[str, float | None]  # None: that API had no price recorded for the day
    saving_usd: dict[str, float | None]  # API cost − electricity cost − remote cost
    energy_reasons: tuple[str, ...]
    remote_cost_usd: float = 0.0  # what the remote API charged (hybrid routing)
    routes: dict[str, RouteLine] | None = None  # "local", "remote": those with requests
    replicas: dict[str, ReplicaLine] | None = None  # by replica URL, or THIS_HOST: each meter's energy


@dataclass(frozen=True, slots=True)
class Report:
    days: list[Line]
    total: Line
    currency: str  # of electricity_cost; "USD" when the ledger mixes currencies
    api_names: list[str]
    usd_rate: float | None  # None: each energy reading's stored USD value was used


def build_report(days: Sequence[DaySummary], usd_rate: float | None = None) -> Report:
    """Turn daily sums into report lines with costs in one currency and savings in USD.

    With one electricity currency in the window its amounts are shown as they are; with several
    (the tariff changed currency), amounts are shown in USD.
    """
    currencies = sorted({currency for day in days for currency in day.electricity_cost})
    currency = currencies[0] if len(currencies) == 1 else "USD" if currencies else ""
    api_names = sorted({name for day in days for name in day.api_cost_usd})
    lines = [_day_line(day, currency, len(currencies) > 1, api_names, usd_rate) for day in days]
    return Report(lines, _total_line(lines, api_names), currency, api_names, usd_rate)


def _route_line(name: str, route: RouteDay, day: DaySummary, currency: str, usd_rate: float | None) -> RouteLine:
    if name == "remote" or not route.electricity_cost or set(route.electricity_cost) != {currency}:
        cost = None  # remote, unmeasured, or in another currency than the report's (then no USD rate)
    else:
        cost = route.electricity_cost[currency]
    if name == "remote":
        cost_usd: float | None = route.remote_cost_usd
    elif cost is None:
        cost_usd = None
    elif currency.upper() == "USD":
        cost_usd = cost
    elif usd_rate is not None:
        cost_usd = cost / usd_rate
    else:  # the rate stored with the day's energy readings
        day_cost = day.electricity_cost.get(currency)
        rate = day_cost / day.electricity_cost_usd if day_cost and day.electricity_cost_usd else None
        cost_usd = None if rate is None else cost / rate
    return RouteLine(route.requests, route.errors, route.prompt_tokens, route.completion_tokens, cost, cost_usd)


def _electricity(
    energy: DaySummary | EnergyDay, currency: str, mixed: bool, usd_rate: float | None
) -> tuple[float | None, float | None]:
    """(cost in the report's currency, in USD) of a day's (or one meter's) measured energy."""
    if energy.total_j is None:
        return None, None
    if mixed:
        return energy.electricity_cost_usd, energy.electricity_cost_usd
    cost = energy.electricity_cost.get(currency, 0.0)
    if currency.upper() == "USD":
        return cost, cost
    if usd_rate is not None:
        return cost, cost / usd_rate
    return cost, energy.electricity_cost_usd


def _replica_line(part: EnergyDay, currency: str, mixed: bool, usd_rate: float | None) -> ReplicaLine:
    cost, cost_usd = _electricity(part, currency, mixed, usd_rate)
    return ReplicaLine(
        energy_status=part.energy_status,
        energy_kwh=_kwh(part.total_j),
        attributed_kwh=_kwh(part.attributed_j),
        energy_measured_s=part.measured_s,
        electricity_cost=cost,
        electricity_cost_usd=cost_usd,
        energy_reasons=part.energy_reasons,
    )


def _day_line(day: DaySummary, currency: str, mixed: bool, api_names: list[str], usd_rate: float | None) -> Line:
    cost, cost_usd = _electricity(day, currency, mixed, usd_rate)
    api_cost = {name: day.api_cost_usd.get(name, 0.0 if day.requests == 0 else None) for name in api_names}
    remote_usd = day.remote_cost_usd
    spent_usd = None if cost_usd is None else cost_usd + remote_usd
    return Line(
        label=day.day.isoformat(),
        requests=day.requests,
        errors=day.errors,
        prompt_tokens=day.prompt_tokens,
        completion_tokens=day.completion_tokens,
        energy_status=day.energy_status,
        energy_kwh=_kwh(day.total_j),
        attributed_kwh=_kwh(day.attributed_j),
        energy_measured_s=day.measured_s,
        electricity_cost=cost,
        electricity_cost_usd=cost_usd,
        api_cost_usd=api_cost,
        saving_usd={name: _minus(api_cost[name], spent_usd) for name in api_names},
        energy_reasons=day.energy_reasons,
        remote_cost_usd=remote_usd,
        routes={name: _route_line(name, route, day, currency, usd_rate) for name, route in sorted(day.routes.items())},
        replicas={
            THIS_HOST if replica is None else replica: _replica_line(part, currency, mixed, usd_rate)
            for replica, part in day.replicas.items()
        },
    )


def _total_line(lines: list[Line], api_names: list[str]) -> Line:
    """Sums; energy and money over the measured days only, so "partial" when some were not."""
    statuses = {line.energy_status for line in lines}
    status = statuses.pop() if len(statuses) == 1 else "partial" if statuses else UNAVAILABLE
    measured = [line for line in lines if line.energy_kwh is not None]
    cost_usd = _sum([line.electricity_cost_usd for line in measured]) if measured else None
    api_cost = {name: _sum([line.api_cost_usd[name] for line in lines]) for name in api_names}
    remote_usd = sum(line.remote_cost_usd for line in lines)
    spent_usd = None if cost_usd is None else cost_usd + remote_usd
    return Line(
        label="TOTAL",
        requests=sum(line.requests for line in lines),
        errors=sum(line.errors for line in lines),
        prompt_tokens=sum(line.prompt_tokens for line in lines),
        completion_tokens=sum(line.completion_tokens for line in lines),
        energy_status=status,
        energy_kwh=_sum([line.energy_kwh for line in measured]) if measured else None,
        attributed_kwh=_sum([line.attributed_kwh for line in measured]) if measured else None,
        energy_measured_s=sum(line.energy_measured_s for line in lines),
        electricity_cost=_sum([line.electricity_cost for line in measured]) if measured else None,
        electricity_cost_usd=cost_usd,
        api_cost_usd=api_cost,
        saving_usd={name: _minus(api_cost[name], spent_usd) for name in api_names},
        energy_reasons=tuple(dict.fromkeys(reason for line in lines for reason in line.energy_reasons))
        or ((NOTHING_IN_WINDOW,) if not lines else ()),
        remote_cost_usd=remote_usd,
        routes=_total_routes(lines),
        replicas=_total_replicas(lines),
    )


def _total_replicas(lines: list[Line]) -> dict[str, ReplicaLine]:
    """Each meter summed over the days it has energy rows; measured days only, as the total."""
    totals: dict[str, ReplicaLine] = {}
    for name in dict.fromkeys(name for line in lines for name in (line.replicas or {})):
        parts = [line.replicas[name] for line in lines if line.replicas and name in line.replicas]
        statuses = {part.energy_status for part in parts}
        measured = [part for part in parts if part.energy_kwh is not None]
        totals[name] = ReplicaLine(
            energy_status=statuses.pop() if len(statuses) == 1 else "partial",
            energy_kwh=_sum([part.energy_kwh for part in measured]) if measured else None,
            attributed_kwh=_sum([part.attributed_kwh for part in measured]) if measured else None,
            energy_measured_s=sum(part.energy_measured_s for part in parts),
            electricity_cost=_sum([part.electricity_cost for part in measured]) if measured else None,
            electricity_cost_usd=_sum([part.electricity_cost_usd for part in measured]) if measured else None,
            energy_reasons=tuple(dict.fromkeys(reason for part in parts for reason in part.energy_reasons)),
        )
    return totals


def _total_routes(lines: list[Line]) -> dict[str, RouteLine]:
    """Each route summed over the days it had requests; an unknown cost on one of them: unknown."""
    totals: dict[str, RouteLine] = {}
    for name in ROUTES + tuple(sorted({n for line in lines for n in (line.routes or {})} - set(ROUTES))):
        parts = [line.routes[name] for line in lines if line.routes and name in line.routes]
        if not parts:
            continue
        totals[name] = RouteLine(
            requests=sum(part.requests for part in parts),
            errors=sum(part.errors for part in parts),
            prompt_tokens=sum(part.prompt_tokens for part in parts),
            completion_tokens=sum(part.completion_tokens for part in parts),
            electricity_cost=_sum([part.electricity_cost for part in parts]),
            cost_usd=_sum([part.cost_usd for part in parts]),
        )
    return totals


def _kwh(energy_j: float | None) -> float | None:
    return None if energy_j is None else kwh(energy_j)


def _sum(values: list[float | None]) -> float | None:
    """Sum, or None when any part is unknown (a partial sum would look complete)."""
    return None if None in values else sum(v for v in values if v is not None)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# --- renderings -----------------------------------------------------------------------------


def _line_json(line: Line) -> dict[str, Any]:
    return {
        "requests": line.requests,
        "errors": line.errors,
        "prompt_tokens": line.prompt_tokens,
        "completion_tokens": line.completion_tokens,
        "energy_status": line.energy_status,
        "energy_kwh": line.energy_kwh,
        "attributed_kwh": line.attributed_kwh,
        "energy_measured_s": line.energy_measured_s,
        "electricity_cost": line.electricity_cost,
        "electricity_cost_usd": line.electricity_cost_usd,
        "api_cost_usd": line.api_cost_usd,
        "saving_usd": line.saving_usd,
        "energy_reasons": list(line.energy_reasons),
        "remote_cost_usd": line.remote_cost_usd,
        "routes": {name: asdict(route) for name, route in (line.routes or {}).items()},
        "replicas": {name: _replica_json(part) for name, part in (line.replicas or {}).items()},
    }


def _replica_json(part: ReplicaLine) -> dict[str, Any]:
    document = asdict(part)
    document["energy_reasons"] = list(part.energy_reasons)
    return document


def report_json(report: Report, ledger: Path, since: datetime, window: str) -> dict[str, Any]:
    """The whole report as one JSON-ready object; unknown numbers are null, never 0."""
    return {
        "since": since.isoformat(timespec="seconds"),
        "window": window,
        "ledger": str(ledger),
        "currency": report.currency,
        "usd_rate": report.usd_rate,
        "apis": report.api_names,
        "days": [{"date": line.label, **_line_json(line)} for line in report.days],
        "total": _line_json(report.total),
        "energy": {"status": report.total.energy_status, "reasons": list(report.total.energy_reasons)},
    }


def csv_header(report: Report) -> list[str]:
    return [
        "date", "requests", "errors", "prompt_tokens", "completion_tokens", "energy_status", "energy_kwh",
        f"electricity_cost_{report.currency or 'unknown'}", "electricity_cost_usd",
        *(f"api_cost_usd_{name}" for name in report.api_names),
        *(f"saving_usd_{name}" for name in report.api_names),
        *(f"{route}_{column}" for route in ROUTES for column in _ROUTE_CSV_COLUMNS),
    ]  # fmt: skip


_ROUTE_CSV_COLUMNS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cost_usd")


def _route_cells(line: Line, cell: Callable[[float | None], str]) -> list[object]:
    cells: list[object] = []
    for name in ROUTES:
        route = (line.routes or {}).get(name) or RouteLine(0, 0, 0, 0, None, 0.0 if name == "remote" else None)
        cells += [route.requests, route.errors, route.prompt_tokens, route.completion_tokens, cell(route.cost_usd)]
    return cells


def write_csv(report: Report, file: TextIO) -> None:
    """One row per day (no total: a spreadsheet sums); unknown numbers are empty cells."""

    def cell(value: float | None) -> str:
        return "" if value is None else repr(value)

    writer = csv.writer(file)
    writer.writerow(csv_header(report))
    for line in report.days:
        writer.writerow([
            line.label, line.requests, line.errors, line.prompt_tokens, line.completion_tokens,
            line.energy_status, cell(line.energy_kwh), cell(line.electricity_cost), cell(line.electricity_cost_usd),
            *(cell(line.api_cost_usd[name]) for name in report.api_names),
            *(cell(line.saving_usd[name]) for name in report.api_names),
            *_route_cells(line, cell),
        ])  # fmt: skip


def render_text(report: Report, ledger: Path, since: datetime, window: str) -> str:
    """Two aligned tables (usage and energy; costs in USD) and the notes a reader needs."""
    out = io.StringIO()
    print(f"Ledger {ledger}", file=out)
    print(f"Last {window}, since {since:%Y-%m-%d %H:%M} ({since.tzname()}), by local day", file=out)
    if not report.days:
        print(f"\n{NOTHING_IN_WINDOW.capitalize()}.", file=out)
        return out.getvalue().rstrip("\n")
    lines = [*report.days, report.total]
    marks = _marks(lines) if report.total.energy_status != "ok" else [""] * len(lines)

    def count(values: list[int]) -> list[str]:
        return [f"{value:,}" for value in values]

    usage = {
        "date": [line.label for line in lines],
        "requests": count([line.requests for line in lines]),
        "errors": count([line.errors for line in lines]),
        "prompt tokens": count([line.prompt_tokens for line in lines]),
        "completion tokens": count([line.completion_tokens for line in lines]),
        "kWh measured": _numbers([line.energy_kwh for line in lines], 3, marks),
        f"electricity {report.currency}".strip(): _numbers([line.electricity_cost for line in lines], 0, marks),
    }
    print(file=out)
    print(_table([("", list(usage))], _rows(list(usage.values()))), file=out)

    hybrid = any(line.routes and "remote" in line.routes for line in lines)
    if report.api_names:
        groups = [("", ["date"]), ("electricity", ["USD"])]
        cost_columns = [usage["date"], _numbers([line.electricity_cost_usd for line in lines], 2)]
        if hybrid:
            groups.append(("remote", ["USD"]))
            cost_columns.append(_numbers([line.remote_cost_usd for line in lines], 2))
        for name in report.api_names:
            groups.append((name, ["cost USD", "saving USD"]))
            cost_columns.append(_numbers([line.api_cost_usd[name] for line in lines], 2, unknown="n/a"))
            cost_columns.append(_numbers([line.saving_usd[name] for line in lines], 2))
        spent = "electricity − remote" if hybrid else "electricity"
        print(f"\nWhat the same tokens would have cost on hosted APIs; saving = API cost − {spent}", file=out)
        print(_table(groups, _rows(cost_columns)), file=out)

    if hybrid:
        print("\nBy route: local = the student (electricity attributed to its requests, idle not included);", file=out)
        print("remote = the remote API (tokens × its price)", file=out)
        print(
            _table(
                [
                    (
                        "",
                        [
                            "date",
                            "route",
                            "requests",
                            "errors",
                            "prompt tokens",
                            "completion tokens",
                            f"electricity {report.currency}".strip(),
                            "cost USD",
                        ],
                    )
                ],
                _route_rows(lines),
            ),
            file=out,
        )

    if _by_replica(lines):
        print("\nEnergy by replica: each measured on its own host (DCGM exporter), or on this host", file=out)
        columns = ["date", "replica", "kWh measured", "kWh attributed", f"electricity {report.currency}".strip(), "USD"]
        print(_table([("", columns)], _replica_rows(lines)), file=out)

    print(file=out)
    for note in _notes(report):
        print(note, file=out)
    return out.getvalue().rstrip("\n")


def _by_replica(lines: list[Line]) -> bool:
    """Worth a table: some replica is measured on its own host (not only this host's devices)."""
    return any(name != THIS_HOST for line in lines for name in (line.replicas or {}))


def _replica_rows(lines: list[Line]) -> list[list[str]]:
    """One row per day and meter; unmeasured energy says so, marked `*` when only partly measured."""
    pairs = [(line, name, part) for line in lines for name, part in (line.replicas or {}).items()]
    marks = ["*" if part.energy_status == "partial" else " " for _, _, part in pairs]
    if not any(mark == "*" for mark in marks):
        marks = [""] * len(pairs)
    energy = _numbers([part.energy_kwh for _, _, part in pairs], 3, marks)
    attributed = _numbers([part.attributed_kwh for _, _, part in pairs], 3)
    cost = _numbers([part.electricity_cost for _, _, part in pairs], 0)
    usd = _numbers([part.electricity_cost_usd for _, _, part in pairs], 2)
    return [
        [line.label, name, kwh_text, attributed_text, cost_text, usd_text]
        for (line, name, _), kwh_text, attributed_text, cost_text, usd_text in zip(
            pairs, energy, attributed, cost, usd, strict=True
        )
    ]


def _route_rows(lines: list[Line]) -> list[list[str]]:
    """One row per day and route that had requests: counts, tokens, the route's own cost."""
    pairs = [(line, name, route) for line in lines for name, route in (line.routes or {}).items()]
    electricity = _numbers([route.electricity_cost for _, _, route in pairs], 0)
    cost_usd = _numbers([route.cost_usd for _, _, route in pairs], 2)
    rows = []
    for (line, name, route), cost, usd in zip(pairs, electricity, cost_usd, strict=True):
        rows.append([
            line.label, name, f"{route.requests:,}", f"{route.errors:,}", f"{route.prompt_tokens:,}",
            f"{route.completion_tokens:,}", "-" if name == "remote" else cost, usd,
        ])  # fmt: skip
    return rows


def _notes(report: Report) -> list[str]:
    total = report.total
    notes = []
    if total.energy_kwh is not None:
        notes.append(
            f"kWh measured: all energy the meter read over {_format_duration(total.energy_measured_s)} while the"
            " gateway ran, idle included;"
        )
        notes.append(f"  {_numbers([total.attributed_kwh], 3)[0]} kWh of it is attributed to requests.")
    if report.usd_rate is not None and report.currency.upper() != "USD":
        notes.append(f"Electricity converted at {report.usd_rate:,g} {report.currency} per USD.")
    if total.energy_status != "ok":
        notes.append("* energy was not measured for all of the window; unmeasured time counts as no energy,")
        notes.append("  so totals understate electricity and overstate savings. Why it was not measured:")
        for reason in total.energy_reasons:
            days = [line.label for line in report.days if reason in line.energy_reasons]
            notes.append(f"  - {', '.join(days)}: {reason}")
    return notes


def _marks(lines: list[Line]) -> list[str]:
    """`*` after numbers that cover only part of their period (explained below the table)."""
    return ["*" if line.energy_status == "partial" else " " for line in lines]


def _numbers(
    values: list[float | None], min_decimals: int, marks: list[str] | None = None, unknown: str = UNAVAILABLE
) -> list[str]:
    """One column, all with the same decimals: enough for two significant digits of its smallest number."""
    nonzero = [abs(value) for value in values if value]
    smallest = min(nonzero, default=1.0)
    decimals = min(max(min_decimals, 1 - math.floor(math.log10(smallest))), 6)
    marks = marks or [""] * len(values)
    return [
        (unknown if value is None else f"{value:,.{decimals}f}") + mark
        for value, mark in zip(values, marks, strict=True)
    ]


def _format_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h"


def _rows(columns: list[list[str]]) -> list[list[str]]:
    return [list(row) for row in zip(*columns, strict=True)]


def _table(groups: list[tuple[str, list[str]]], rows: list[list[str]]) -> str:
    """Aligned columns: the first left, the rest right; group labels (if any) on a line above."""
    names = [name for _, columns in groups for name in columns]
    widths = [max(len(name), *(len(row[i]) for row in rows)) for i, name in enumerate(names)]
    top, column = [], 0
    for label, columns in groups:
        span = sum(widths[column : column + len(columns)]) + 2 * (len(columns) - 1)
        if len(label) > span:
            widths[column + len(columns) - 1] += len(label) - span
            span = len(label)
        top.append(label.ljust(span))
        column += len(columns)

    def format_row(cells: list[str]) -> str:
        first, *rest = cells
        return "  ".join([first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))])

    header = [format_row(names)]
    if any(label for label, _ in groups):
        header.insert(0, "  ".join(top).rstrip())
    return "\n".join([*header, *(format_row(row) for row in rows)])
