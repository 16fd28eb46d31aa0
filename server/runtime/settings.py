"""The one settings object of a `student serve` process: read once at start-up, then passed in.

Values come from `STUDENT_*` environment variables, overridden by command-line flags.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.accounting.ledger import default_ledger_path
from server.accounting.tariff import DEFAULT_PRICE_PER_KWH_VND, DEFAULT_USD_RATE, ApiPrice, Tariff, default_api_prices
from server.control.hybrid_routing import DEFAULT_KEYWORDS, DEFAULT_ROUTE_HEADER, RoutingRules
from server.telemetry.dcgm_source import DEFAULT_INTERVAL_S, ExporterTarget, parse_exporter_spec

Device = Literal["auto", "cpu", "gpu"]
PowerSourceChoice = Literal["auto", "nvml", "rapl", "none"]
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP token (RFC 9110 §5.1)


def default_cache_dir() -> Path:
    """Where built artefacts (the demo student) are kept between runs."""
    return Path.home() / ".cache" / "student-serve"


class Settings(BaseSettings):
    """Everything `student serve` needs to run the gateway and (optionally) its vLLM child."""

    model_config = SettingsConfigDict(env_prefix="STUDENT_", extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="gateway address")
    port: int = Field(8000, ge=1, le=65535, description="gateway port")

    model_dir: Path | None = Field(None, description="merged student directory (default: the demo student)")
    served_model_name: str = Field("student", description="model name clients send")
    # vLLM servers to front (replicas); none: start and supervise one. The environment takes a
    # comma-separated list as STUDENT_UPSTREAM_URLS or, as before, STUDENT_UPSTREAM_URL (an
    # alias stops env_prefix applying, hence the full names); `upstream_url=` still works too.
    upstream_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("student_upstream_urls", "student_upstream_url"),
        description="front an already running vLLM instead of starting one; several: replicas, balanced and "
        "health-checked",
    )
    health_check_interval_s: float = Field(2.0, gt=0, description="how often each upstream's /health is polled")

    profile: str | None = Field(None, description="hardware profile filling unset options (e.g. rtx4090)")
    vllm_host: str = "127.0.0.1"
    vllm_port: int = Field(8001, ge=1, le=65535, description="port of the vLLM child")
    device: Device = Field("auto", description="where vLLM runs; auto: gpu if nvidia-smi exists")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="weights dtype in vLLM")
    max_model_len: int | None = Field(None, ge=16, description="context length in tokens (default: the model's own)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences vLLM runs at once")
    kv_cache_gib: float = Field(2.0, gt=0, description="CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)")
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    vllm_extra_args: list[str] = Field(default_factory=list, description="extra argument for vLLM (repeatable)")
    vllm_start_timeout_s: float = Field(600.0, gt=0)
    vllm_stop_timeout_s: float = Field(20.0, gt=0)

    upstream_connect_timeout_s: float = Field(10.0, gt=0)
    upstream_read_timeout_s: float = Field(600.0, gt=0, description="whole answers: longest silence between bytes")
    first_token_timeout_s: float = Field(
        120.0,
        gt=0,
        description="streams: end with a 504 error event (and abort upstream) if no token came in this many seconds",
    )
    inter_token_timeout_s: float = Field(
        30.0, gt=0, description="streams: the same when the upstream goes silent this many seconds between tokens"
    )
    upstream_max_connections: int = Field(4096, ge=1)
    ready_timeout_s: float = Field(2.0, gt=0)
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM or Ctrl-C: stop accepting, let answers in flight finish this many seconds"
    )

    access_log: bool = Field(False, description="log one line per request: status, tokens, TTFT, TPOT, latency")

    api_keys: str | None = Field(None, repr=False, description="name=key pairs, comma-separated")
    api_keys_file: Path | None = Field(
        None, description="file of name=key lines; /v1/* then needs Authorization: Bearer KEY (or STUDENT_API_KEYS)"
    )
    observability_access: Literal["open", "key", "localhost"] = Field(
        "open", description="who may read /metrics, /stats, /dashboard"
    )
    rate_limit_rpm: int | None = Field(None, ge=1, description="requests per minute per key (429 + Retry-After beyond)")
    rate_limit_tpm: int | None = Field(
        None,
        ge=1,
        description="tokens (prompt + completion) per minute per key, charged as answers finish "
        "(429 + Retry-After beyond)",
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    max_in_flight: int | None = Field(
        None, ge=1, description="answers the gateway lets run at once (default: 2 x max-num-seqs)"
    )
    max_queue: int | None = Field(
        None, ge=0, description="requests waiting for a slot before 429 (default: 3 x max-num-seqs)"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir)

    telemetry: bool = Field(True, description="measure requests (metrics, stats, ledger); off only to benchmark")
    stream_trace_path: Path | None = Field(
        None, description="diagnostics: a JSON line per stream with when each upstream read came and went out"
    )
    ledger_path: Path = Field(default_factory=default_ledger_path, description="SQLite ledger file")
    stats_retention: int = Field(100_000, ge=100, description="finished requests kept in memory for /stats")

    power_source: PowerSourceChoice = Field("auto", description="energy meter source; auto: NVML, else RAPL")
    idle_w: float | None = Field(None, ge=0, description="idle power in watts (default: measured over the first 5 s)")
    idle_window_s: float = Field(5.0, gt=0)
    energy_sample_hz: float = Field(10.0, gt=0, le=1000)
    power_limit_w: float | None = Field(
        None, gt=0, description="cap each GPU at this many watts at start (NVML, needs root); restored at exit"
    )
    energy_ledger_interval_s: float = Field(60.0, gt=0, description="how often energy totals go to the ledger")
    # Per-replica energy from each replica host's DCGM exporter (server/telemetry/dcgm_source.py).
    energy_exporters: Annotated[dict[str, ExporterTarget], NoDecode] = Field(
        default_factory=dict,
        description="read the energy of replica URL from the DCGM exporter on its host, e.g. http://gpu1:9400/metrics, "
        "summing GPUS (gpu indices or GPU-... UUIDs, comma-separated; default: all it lists); replicas without one "
        "are measured on this host (repeatable)",
    )
    energy_exporter_interval_s: float = Field(
        DEFAULT_INTERVAL_S, gt=0, le=60, description="how often each DCGM exporter is read, in seconds"
    )

    price_per_kwh: float = Field(DEFAULT_PRICE_PER_KWH_VND, ge=0, description="electricity price per kWh")
    currency: str = Field("VND", description="currency of the electricity price")
    usd_rate: float = Field(DEFAULT_USD_RATE, gt=0, description="units of the currency per USD")
    wall_power_factor: float = Field(
        1.0, ge=1.0, description="measured energy x this = estimate at the wall (1.0: the device only)"
    )
    api_prices: dict[str, ApiPrice] = Field(default_factory=default_api_prices)

    # Hybrid routing (server/control/hybrid_routing.py): an OpenAI-compatible remote beside the local student.
    remote_url: str | None = Field(
        None, description="the remote's OpenAI-compatible root, e.g. https://api.deepseek.com (enables routing)"
    )
    remote_model: str | None = Field(None, description="model name sent to the remote (required with a remote)")
    remote_api_key_env: str | None = Field(
        None, description="environment variable holding the remote's key (read at start, sent as Bearer, never shown)"
    )
    remote_price: str | None = Field(
        None,
        description="remote's USD per 1M tokens: IN,OUT or one number, or an API price table name "
        "(default: the remote model's entry)",
    )
    route_header: str = Field(DEFAULT_ROUTE_HEADER, description="request header naming the route: local|remote")
    route_remote_models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["remote"],
        description="a requested model name that means remote (repeatable; the remote's model always does)",
    )
    route_keywords: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_KEYWORDS),
        description="a last user message containing this goes remote (repeatable)",
    )
    fallback_to_remote: bool = Field(True, description="local not ready or at capacity: send to the remote instead")
    _remote_api_key: SecretStr | None = PrivateAttr(None)  # read from `remote_api_key_env` once, at start-up

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

    @field_validator("energy_exporters", mode="before")
    @classmethod
    def _parse_exporters(cls, value: Any) -> Any:
        """`REPLICA=EXPORTER[#GPU,...]` strings (the flag, repeated), or from the environment a JSON
        object {replica: "EXPORTER[#GPU,...]" or {"url": ..., "gpus": [...]}}, a JSON list of such
        strings, or a comma list (a part without '=' continues the GPU list before it)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith(("{", "[")):
                value = json.loads(text)
            else:
                value = []
                for part in (part.strip() for part in text.split(",")):
                    if part and "=" not in part and value:
                        value[-1] += "," + part
                    elif part:
                        value.append(part)
        if isinstance(value, dict):
            parsed = {}
            for replica, target in value.items():
                if isinstance(target, dict):  # {"url": ..., "gpus": [...]}
                    gpus = ",".join(str(gpu) for gpu in target.get("gpus") or ())
                    target = f"{target.get('url', '')}" + (f"#{gpus}" if gpus else "")
                root, exporter = parse_exporter_spec(f"{replica}={target}")  # (an ExporterTarget prints as one)
                parsed[root] = exporter
            return parsed
        if isinstance(value, (list, tuple)):
            parsed = {}
            for spec in value:
                root, exporter = parse_exporter_spec(str(spec))
                if root in parsed:
                    raise ValueError(f"energy exporter for {root} is given twice")
                parsed[root] = exporter
            return parsed
        return value

    @field_validator("remote_url")
    @classmethod
    def _remote_is_http(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"remote URL must look like https://host[/path], got {url!r}")
        return url.rstrip("/").removesuffix("/v1")

    @field_validator("route_remote_models", "route_keywords", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """From the environment: a JSON list, or comma-separated (empty: none)."""
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                return json.loads(value)
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("route_header")
    @classmethod
    def _header_is_a_token(cls, name: str) -> str:
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"route header must be an HTTP header name, got {name!r}")
        return name

    @model_validator(mode="after")
    def _remote_is_complete(self) -> Settings:
        """A remote needs a model, a price and (when named) its key; read the key now, once."""
        if self.remote_url is None:
            given = [name for name in ("remote_model", "remote_api_key_env", "remote_price") if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} set but no remote_url (--remote-url / STUDENT_REMOTE_URL)")
            return self
        if not self.remote_model:
            raise ValueError(
                "remote_url needs remote_model (--remote-model / STUDENT_REMOTE_MODEL): "
                "the model name sent to the remote"
            )
        self._remote_price()  # fails now, not at the first remote request
        if self.remote_api_key_env is not None:
            key = os.environ.get(self.remote_api_key_env, "").strip()
            if not key:
                raise ValueError(
                    f"remote_api_key_env (--remote-api-key-env / STUDENT_REMOTE_API_KEY_ENV) names "
                    f"${self.remote_api_key_env}, which is not set or empty"
                )
            self._remote_api_key = SecretStr(key)
        return self

    def _remote_price(self) -> ApiPrice:
        text = (self.remote_price or "").strip()
        if not text:
            if self.remote_model in self.api_prices:
                return self.api_prices[self.remote_model]
            raise ValueError(
                f"remote_price (--remote-price / STUDENT_REMOTE_PRICE) is needed to account the remote's cost: "
                f"USD per 1M tokens as 'IN,OUT' or one number, or one of {sorted(self.api_prices)}"
            )
        if text in self.api_prices:
            return self.api_prices[text]
        parts = [part.strip() for part in text.split(",")]
        try:
            numbers = [float(part) for part in parts]
        except ValueError:
            raise ValueError(
                f"remote_price {text!r}: expected USD per 1M tokens ('IN,OUT' or one number) "
                f"or one of {sorted(self.api_prices)}"
            ) from None
        if len(numbers) not in (1, 2) or any(not number >= 0 for number in numbers):
            raise ValueError(f"remote_price {text!r}: one or two numbers >= 0 (USD per 1M input, output tokens)")
        return ApiPrice(input_usd_per_mtok=numbers[0], output_usd_per_mtok=numbers[-1], source=f"remote_price {text!r}")

    @model_validator(mode="after")
    def _exporters_name_upstreams(self) -> Settings:
        """Each energy exporter belongs to one of the replicas the gateway fronts."""
        unknown = [replica for replica in self.energy_exporters if replica not in self.upstream_base_urls]
        if unknown:
            raise ValueError(
                f"energy exporter given for {', '.join(unknown)}, which is not an upstream "
                f"(--upstream: {', '.join(self.upstream_base_urls)})"
            )
        return self

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
    def has_remote(self) -> bool:
        return self.remote_url is not None

    @property
    def remote_api_key(self) -> str | None:
        """The remote's key, read from `$remote_api_key_env` when the settings were made."""
        return None if self._remote_api_key is None else self._remote_api_key.get_secret_value()

    @property
    def remote_api_price(self) -> ApiPrice | None:
        """The remote's price per 1M tokens (None without a remote)."""
        return self._remote_price() if self.has_remote else None

    @property
    def routing_rules(self) -> RoutingRules:
        """The rules of server/control/hybrid_routing.py: the remote's model name means remote too, unless it is
        also the name the student is served under (a request for that name is the student's)."""
        models = {*self.route_remote_models, *([self.remote_model] if self.remote_model else [])}
        models.discard(self.served_model_name)
        return RoutingRules.of(self.route_header, models, self.route_keywords, self.fallback_to_remote)

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
