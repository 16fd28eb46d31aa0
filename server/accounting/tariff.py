"""Turn joules into electricity money, and tokens into what a hosted API would have charged.

Defaults and where they come from:

* Tariff: 2,998 VND/kWh, Vietnam's EVN residential tier 4 (201–300 kWh a month) before VAT,
  from the tariff in force since 10 May 2025. A 24/7 GPU box usually lands in that tier or
  above; put the marginal price from your own bill in `STUDENT_PRICE_PER_KWH`.
* USD rate: 25,000 VND per USD, the rate the article uses.
* API prices (USD per million tokens) are the table of the article this project follows (its
  "Bảng So Sánh Chi Phí"): GPT-4.1 $8, Claude Sonnet 4.5 $15, DeepSeek V3.2 $0.42. The article
  gives one price per model and applies it to all tokens, so input and output default to the
  same number; set real input/output prices in `STUDENT_API_PRICES` (JSON) when you compare with
  a price list.
* Wall-power factor 1.0: the measured device only (GPU or CPU package). A factor above 1 adds the
  rest of the box (PSU losses, CPU, RAM, fans) as an estimate, and every output says it is one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, Field

from server.accounting.energy_units import kwh

TOKENS_PER_MTOK = 1_000_000.0

DEFAULT_PRICE_PER_KWH_VND = 2998.0
DEFAULT_USD_RATE = 25_000.0


class ApiPrice(BaseModel):
    """A hosted API's list price in USD per million tokens, and where the number comes from."""

    input_usd_per_mtok: float = Field(ge=0)
    output_usd_per_mtok: float = Field(ge=0)
    source: str = ""


def default_api_prices() -> dict[str, ApiPrice]:
    article = "article's model table (one price per MTok, applied to input and output)"
    return {
        "gpt-4.1": ApiPrice(input_usd_per_mtok=8.0, output_usd_per_mtok=8.0, source=article),
        "claude-sonnet-4.5": ApiPrice(input_usd_per_mtok=15.0, output_usd_per_mtok=15.0, source=article),
        "deepseek-v3.2": ApiPrice(input_usd_per_mtok=0.42, output_usd_per_mtok=0.42, source=article),
    }


@dataclass(frozen=True, slots=True)
class Tariff:
    """Electricity price and how measured joules become a bill.

    `wall_power_factor` multiplies measured energy to estimate the whole box at the wall.
    """

    price_per_kwh: float = DEFAULT_PRICE_PER_KWH_VND
    currency: str = "VND"
    usd_rate: float = DEFAULT_USD_RATE
    wall_power_factor: float = 1.0

    def energy_cost(self, energy_j: float | None) -> float | None:
        """Cost of `energy_j` joules in `currency` (None when the energy is unknown)."""
        if energy_j is None:
            return None
        return kwh(energy_j * self.wall_power_factor) * self.price_per_kwh

    def to_usd(self, amount: float | None) -> float | None:
        """`amount` in `currency` converted to USD (1:1 when the currency is USD)."""
        if amount is None:
            return None
        return amount if self.currency.upper() == "USD" else amount / self.usd_rate


def api_cost_usd(price: ApiPrice, prompt_tokens: int | None, completion_tokens: int | None) -> float:
    """What `price`'s API would have charged for these tokens, USD (unknown counts count as 0)."""
    return (
        (prompt_tokens or 0) * price.input_usd_per_mtok + (completion_tokens or 0) * price.output_usd_per_mtok
    ) / TOKENS_PER_MTOK


def api_costs_usd(
    prices: Mapping[str, ApiPrice], prompt_tokens: int | None, completion_tokens: int | None
) -> dict[str, float]:
    """`api_cost_usd` for every API in the table."""
    return {name: api_cost_usd(price, prompt_tokens, completion_tokens) for name, price in prices.items()}


def projected_month(
    idle_w: float | None,
    energy_per_request_j: float | None,
    requests_per_day: float,
    tariff: Tariff,
    days: float = 30.0,
) -> float | None:
    """A month's electricity in `tariff.currency`: the box idling all month plus the requests.

    idle_w × 24 h × days + energy per request × requests per day × days, both through the
    tariff (wall factor included). None when either energy figure is unknown.
    """
    if idle_w is None or energy_per_request_j is None:
        return None
    idle_j = idle_w * 24 * 3600 * days
    active_j = energy_per_request_j * requests_per_day * days
    return tariff.energy_cost(idle_j + active_j)
