"""The one settings object of a `student serve` process: read once at start-up, then passed in.

Values come from `STUDENT_*` environment variables, overridden by command-line flags.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.costs import DEFAULT_PRICE_PER_KWH_VND, DEFAULT_USD_RATE, ApiPrice, Tariff, default_api_prices
from server.ledger import default_ledger_path

Device = Literal["auto", "cpu", "gpu"]
PowerSourceChoice = Literal["auto", "nvml", "rapl", "none"]


def default_cache_dir() -> Path:
    """Where built artefacts (the demo student) are kept between runs."""
    return Path.home() / ".cache" / "student-serve"


class Settings(BaseSettings):
    """Everything `student serve` needs to run the gateway and (optionally) its vLLM child."""

    model_config = SettingsConfigDict(env_prefix="STUDENT_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    model_dir: Path | None = None
    served_model_name: str = "student"
    # vLLM servers to front (replicas); none: start and supervise one. The environment takes a
    # comma-separated list as STUDENT_UPSTREAM_URLS or, as before, STUDENT_UPSTREAM_URL (an
    # alias stops env_prefix applying, hence the full names); `upstream_url=` still works too.
    upstream_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias=AliasChoices("student_upstream_urls", "student_upstream_url")
    )
    health_check_interval_s: float = Field(2.0, gt=0, description="how often each upstream's /health is polled")

    profile: str | None = Field(None, description="named hardware profile (server/profiles.py)")
    vllm_host: str = "127.0.0.1"
    vllm_port: int = Field(8001, ge=1, le=65535)
    device: Device = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="tokens; None: the model's own limit")
    max_num_seqs: int = Field(64, ge=1)
    kv_cache_gib: float = Field(2.0, gt=0, description="CPU only: VLLM_CPU_KVCACHE_SPACE, GiB")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    vllm_extra_args: list[str] = Field(default_factory=list)
    vllm_start_timeout_s: float = Field(600.0, gt=0)
    vllm_stop_timeout_s: float = Field(20.0, gt=0)

    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    upstream_read_timeout_s: float = Field(600.0, gt=0, description="whole answers: longest silence between bytes")
    first_token_timeout_s: float = Field(120.0, gt=0, description="streams: longest wait for the first event")
    inter_token_timeout_s: float = Field(30.0, gt=0, description="streams: longest silence between events")
    upstream_max_connections: int = Field(4096, ge=1)
    ready_timeout_s: float = Field(2.0, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long answers in flight may finish")

    access_log: bool = False

    api_keys: str | None = Field(None, repr=False, description="name=key pairs, comma-separated")
    api_keys_file: Path | None = Field(None, description="file of name=key lines")
    observability_access: Literal["open", "key", "localhost"] = "open"
    rate_limit_rpm: int | None = Field(None, ge=1, description="requests per minute per key")
    rate_limit_tpm: int | None = Field(None, ge=1, description="tokens (prompt + completion) per minute per key")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_in_flight: int | None = Field(None, ge=1, description="default 2 × max_num_seqs")
    max_queue: int | None = Field(None, ge=0, description="default 3 × max_num_seqs")
    cache_dir: Path = Field(default_factory=default_cache_dir)

    telemetry: bool = Field(True, description="measure requests (metrics, stats, ledger); off only to benchmark")
    ledger_path: Path = Field(default_factory=default_ledger_path)
    stats_retention: int = Field(100_000, ge=100, description="finished requests kept in memory for /stats")

    power_source: PowerSourceChoice = "auto"
    idle_w: float | None = Field(None, ge=0, description="watts; None: measured at start-up")
    idle_window_s: float = Field(5.0, gt=0)
    energy_sample_hz: float = Field(10.0, gt=0, le=1000)
    power_limit_w: float | None = Field(None, gt=0, description="cap each GPU at this many W (NVML, root)")
    energy_ledger_interval_s: float = Field(60.0, gt=0, description="how often energy totals go to the ledger")

    price_per_kwh: float = Field(DEFAULT_PRICE_PER_KWH_VND, ge=0)
    currency: str = "VND"
    usd_rate: float = Field(DEFAULT_USD_RATE, gt=0, description="units of `currency` per USD")
    wall_power_factor: float = Field(1.0, ge=1.0, description="measured energy × this = estimate at the wall")
    api_prices: dict[str, ApiPrice] = Field(default_factory=default_api_prices)

    @model_validator(mode="before")
    @classmethod
    def _accept_upstream_url(cls, data: Any) -> Any:
        """`Settings(upstream_url=...)`, the name of one upstream before replicas, still works."""
        if isinstance(data, dict) and "upstream_url" in data:  # only a keyword argument has this key
            data = {k: v for k, v in data.items() if k not in ("student_upstream_urls", "student_upstream_url")}
            single = data.pop("upstream_url")
            data["upstream_urls"] = [] if single is None else single
        return data

    @field_validator("upstream_urls", mode="before")
    @classmethod
    def _split_upstreams(cls, urls: Any) -> Any:
        if isinstance(urls, str):
            return [url.strip() for url in urls.split(",") if url.strip()]
        return urls

    @field_validator("upstream_urls")
    @classmethod
    def _upstreams_are_http(cls, urls: list[str]) -> list[str]:
        roots: list[str] = []
        for url in urls:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"upstream URL must look like http://host:port, got {url!r}")
            root = url.rstrip("/").removesuffix("/v1")
            if root in roots:
                raise ValueError(f"upstream {root} is given twice")
            roots.append(root)
        return roots

    @model_validator(mode="after")
    def _ports_differ(self) -> Settings:
        if self.manages_vllm and self.port == self.vllm_port and self.host == self.vllm_host:
            raise ValueError(f"gateway and vLLM cannot both listen on {self.host}:{self.port}")
        return self

    @property
    def upstream_base_urls(self) -> list[str]:
        """Root URLs (no trailing /v1) of the vLLM servers the gateway forwards to: the
        `--upstream` ones, or the vLLM child's."""
        return list(self.upstream_urls) or [f"http://{self.vllm_host}:{self.vllm_port}"]

    @property
    def upstream_base_url(self) -> str:
        """The first upstream's root URL: the vLLM child's when `student serve` manages it."""
        return self.upstream_base_urls[0]

    @property
    def admission_limits(self) -> tuple[int, int]:
        """(answers in flight, waiting line): by default 2 and 3 × vLLM's batch (5 in all)."""
        in_flight = self.max_in_flight if self.max_in_flight is not None else 2 * self.max_num_seqs
        queue = self.max_queue if self.max_queue is not None else 3 * self.max_num_seqs
        return in_flight, queue

    @property
    def tariff(self) -> Tariff:
        return Tariff(self.price_per_kwh, self.currency, self.usd_rate, self.wall_power_factor)

    @property
    def manages_vllm(self) -> bool:
        """True when `student serve` starts vLLM itself rather than fronting `--upstream`."""
        return not self.upstream_urls

    def resolved_device(self) -> Literal["cpu", "gpu"]:
        """`auto` means GPU when an NVIDIA driver is visible (nvidia-smi on PATH)."""
        if self.device != "auto":
            return self.device
        return "gpu" if shutil.which("nvidia-smi") else "cpu"
