"""What 1,000 answers cost: measured energy behind a student-serve gateway, tokens × price elsewhere.

**Energy of exactly the eval's requests.** A student-serve gateway attributes energy to every
request it finishes and keeps all-time counters in `GET /stats` (no `window`): `requests.total`,
`routes.local.energy_j` (the sum of the energy attributed to its requests, idle not included),
`routes.local.cost` (that energy's electricity in the gateway's tariff, and in USD),
`routes.remote.cost.usd` (what requests routed to a remote API cost) and `energy.total_j`
(everything the meter measured, idle included). `student eval` reads /stats right before a
target's first question and right after its last answer, and takes the differences. Targets are
answered one after the other and the judge only afterwards, so nothing else of this run lands
in between. Why this and not the alternatives:

- `/stats?window=S` counts from "now minus S": the window would have to be guessed, its energy
  comes from once-a-second notes, and requests finished just before the run would leak in. The
  all-time counters are exact sums.
- Ledger rows (`server/accounting/ledger.py`) carry no request id either, so they cannot single
  out the eval's requests any better than a time window; they need the ledger file on this
  machine (the gateway may be remote) and energy rows are written only every few minutes.

Other clients of the same gateway during the run are visible as more requests than this run
sent (`other_requests`); their energy is then in the difference too, and the per-answer figure
averages over every request the gateway finished in between (the report says so).

When the gateway measures no energy (`energy.status` is not "ok": no GPU, no RAPL) the cost is
"not measured" with the gateway's own `energy.reason`; a server without /stats is "not
measured: not a student-serve gateway". Units: joules, kWh, the gateway's currency, USD.

**Tokens × price** for a target given `--price` (USD per million tokens, input and output, or a
name from `server.accounting.tariff.default_api_prices`): the `usage` of its answers.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from models.distill.teacher import error_text
from models.evaluation.errors import EvalError
from server.accounting.energy_units import kwh
from server.accounting.tariff import TOKENS_PER_MTOK, ApiPrice, default_api_prices

PER_ANSWERS = 1000
NOT_A_GATEWAY = "not a student-serve gateway"
STATS_TIMEOUT_S = 30.0


def parse_price(text: str) -> tuple[str, ApiPrice]:
    """`IN,OUT` or one number for both (USD per million input and output tokens, as the gateway's
    `--remote-price`) or a name from the API price table: (the name to show, the price)."""
    table = default_api_prices()
    if text in table:
        return text, table[text]
    parts = text.split(",")
    try:
        if len(parts) not in (1, 2):
            raise ValueError
        numbers = [float(part) for part in parts]
        price = ApiPrice(input_usd_per_mtok=numbers[0], output_usd_per_mtok=numbers[-1], source="--price")
    except ValueError:
        names = ", ".join(table)
        raise EvalError(
            f"price {text!r} is not IN,OUT or one number (USD per 1M tokens, >= 0), nor a known API ({names})"
        ) from None
    return f"${price.input_usd_per_mtok:g} in, ${price.output_usd_per_mtok:g} out per 1M tokens", price


@dataclass(frozen=True)
class TokenCost:
    """Tokens × price, USD: for all the answers and per 1,000 answers."""

    price: str
    input_usd_per_mtok: float
    output_usd_per_mtok: float
    usd: float
    usd_per_1000_answers: float | None


def token_cost(name: str, price: ApiPrice, prompt_tokens: int, completion_tokens: int, answers: int) -> TokenCost:
    usd = (prompt_tokens * price.input_usd_per_mtok + completion_tokens * price.output_usd_per_mtok) / TOKENS_PER_MTOK
    per_1000 = usd / answers * PER_ANSWERS if answers else None
    return TokenCost(name, price.input_usd_per_mtok, price.output_usd_per_mtok, usd, per_1000)


@dataclass(frozen=True)
class StatsProbe:
    """A GET /stats: the document when it is a student-serve gateway's, else why energy is unknown."""

    document: dict[str, Any] | None
    reason: str | None


async def fetch_stats(root: str, api_key: str | None) -> StatsProbe:
    """The server's all-time /stats, or the reason there is none (never raises for HTTP trouble)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        timeout = aiohttp.ClientTimeout(total=STATS_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{root}/stats", headers=headers) as response,
        ):
            body, status = await response.read(), response.status
    except (aiohttp.ClientError, TimeoutError) as error:
        return StatsProbe(None, f"GET /stats failed: {error or type(error).__name__}")
    document = _json_object(body)
    if status == 200 and isinstance(document, dict) and isinstance(document.get("energy"), dict):
        return StatsProbe(document, None)
    if status != 200 and isinstance(document, dict) and isinstance(document.get("error"), dict):
        return StatsProbe(None, f"the gateway's /stats answered {error_text(status, body)}")  # a gateway that says no
    return StatsProbe(None, NOT_A_GATEWAY)


def _json_object(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


@dataclass(frozen=True)
class EnergyCost:
    """The gateway's measured energy and electricity for the eval's requests (see the module
    docstring). `reason` is set, and the figures None, when it is not measured."""

    measured: bool
    reason: str | None
    gateway_requests: int | None = None  # requests the gateway finished during the run
    other_requests: int | None = None  # of those, more than this run sent
    attributed_j: float | None = None  # attributed to requests, idle not included
    total_j: float | None = None  # everything the meter measured over the run, idle included
    currency: str | None = None
    electricity: float | None = None  # of attributed_j, in `currency`
    electricity_usd: float | None = None
    remote_usd: float | None = None  # requests the gateway routed to a remote API
    j_per_1000_answers: float | None = None
    kwh_per_1000_answers: float | None = None
    electricity_per_1000_answers: float | None = None
    usd_per_1000_answers: float | None = None  # electricity + remote

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def summary(self) -> str:
        """One line for the report table."""
        if not self.measured:
            return f"not measured: {self.reason}"
        return (
            f"{self.electricity_per_1000_answers:.4g} {self.currency} (${self.usd_per_1000_answers:.4g}); "
            f"{self.kwh_per_1000_answers:.4g} kWh"
        )


def not_measured(reason: str) -> EnergyCost:
    return EnergyCost(measured=False, reason=reason)


def gateway_energy(before: dict[str, Any], after: dict[str, Any], sent_requests: int) -> EnergyCost:
    """The differences of two all-time /stats documents, taken around the eval's requests."""
    energy = after.get("energy") or {}
    if energy.get("status") != "ok":
        return not_measured(str(energy.get("reason") or "the gateway's energy status is not ok"))
    gateway_requests = _count(after, "requests", "total") - _count(before, "requests", "total")
    if gateway_requests <= 0:
        return not_measured("the gateway counted none of the eval's requests")
    local_before, local_after = _route(before, "local"), _route(after, "local")
    if local_after.get("energy_j") is None:
        return not_measured("the gateway attributed no energy to the eval's requests")
    attributed_j = local_after["energy_j"] - (local_before.get("energy_j") or 0.0)
    cost_before, cost_after = local_before.get("cost") or {}, local_after.get("cost") or {}
    electricity = _difference(cost_after.get("electricity"), cost_before.get("electricity"))
    electricity_usd = _difference(cost_after.get("usd"), cost_before.get("usd"))
    remote_usd = _difference(
        (_route(after, "remote").get("cost") or {}).get("usd"), (_route(before, "remote").get("cost") or {}).get("usd")
    )
    total_j = _difference((after.get("energy") or {}).get("total_j"), (before.get("energy") or {}).get("total_j"))
    per_answer = PER_ANSWERS / gateway_requests
    spent_usd = None if electricity_usd is None else electricity_usd + (remote_usd or 0.0)
    return EnergyCost(
        measured=True,
        reason=None,
        gateway_requests=gateway_requests,
        other_requests=max(0, gateway_requests - sent_requests),
        attributed_j=attributed_j,
        total_j=total_j,
        currency=cost_after.get("currency"),
        electricity=electricity,
        electricity_usd=electricity_usd,
        remote_usd=remote_usd,
        j_per_1000_answers=attributed_j * per_answer,
        kwh_per_1000_answers=kwh(attributed_j * per_answer),
        electricity_per_1000_answers=None if electricity is None else electricity * per_answer,
        usd_per_1000_answers=None if spent_usd is None else spent_usd * per_answer,
    )


def _count(document: dict[str, Any], block: str, name: str) -> int:
    value = (document.get(block) or {}).get(name)
    return int(value) if isinstance(value, (int, float)) else 0


def _route(document: dict[str, Any], name: str) -> dict[str, Any]:
    return (document.get("routes") or {}).get(name) or {}


def _difference(after: float | None, before: float | None) -> float | None:
    """after − before; a counter that was still None before counts from 0."""
    return None if after is None else after - (before or 0.0)
