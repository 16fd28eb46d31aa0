"""The flags of `student serve`: each one sets a `Settings` field, whose description is its help.

Defaults and help texts are written once, on the settings object (`server.runtime.settings`);
the parser and the docs' option table (generated at docs build time from `option_rows`) are
made from it, so the three cannot disagree.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.runtime.profiles import PROFILES
from server.runtime.settings import Settings

MAIN = None
ACCESS = "who may call, and how many at once"
HYBRID = "hybrid routing: a remote OpenAI-compatible API beside the student"
MEASURING = "measuring and money"


@dataclass(frozen=True)
class Flag:
    """`--name` setting `Settings.<setting>`; `options` go to argparse as they are."""

    name: str
    setting: str
    group: str | None = MAIN
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def dest(self) -> str:
        return self.options.get("dest", self.name.removeprefix("--").replace("-", "_"))


FLAGS: tuple[Flag, ...] = (
    Flag("--model", "model_dir", options={"type": Path}),
    Flag("--profile", "profile", options={"choices": sorted(PROFILES)}),
    Flag("--host", "host"),
    Flag("--port", "port", options={"type": int}),
    Flag("--vllm-port", "vllm_port", options={"type": int}),
    Flag("--upstream", "upstream_urls", options={"metavar": "URL", "action": "append"}),
    Flag("--served-model-name", "served_model_name"),
    Flag("--device", "device", options={"choices": ["auto", "cpu", "gpu"]}),
    Flag("--dtype", "dtype", options={"choices": ["auto", "float32", "bfloat16", "float16"]}),
    Flag("--max-model-len", "max_model_len", options={"type": int}),
    Flag("--max-num-seqs", "max_num_seqs", options={"type": int}),
    Flag("--kv-cache-gib", "kv_cache_gib", options={"type": float}),
    Flag("--vllm-arg", "vllm_extra_args", options={"action": "append"}),
    Flag("--access-log", "access_log", options={"action": "store_true", "default": None}),
    Flag("--api-keys-file", "api_keys_file", ACCESS, {"type": Path}),
    Flag("--observability", "observability_access", ACCESS, {"choices": ["open", "key", "localhost"]}),
    Flag("--rate-limit-rpm", "rate_limit_rpm", ACCESS, {"type": int}),
    Flag("--rate-limit-tpm", "rate_limit_tpm", ACCESS, {"type": int}),
    Flag("--max-in-flight", "max_in_flight", ACCESS, {"type": int}),
    Flag("--max-queue", "max_queue", ACCESS, {"type": int}),
    Flag("--drain-timeout-s", "drain_timeout_s", ACCESS, {"type": float}),
    Flag("--first-token-timeout-s", "first_token_timeout_s", ACCESS, {"type": float}),
    Flag("--inter-token-timeout-s", "inter_token_timeout_s", ACCESS, {"type": float}),
    Flag("--remote-url", "remote_url", HYBRID, {"metavar": "URL"}),
    Flag("--remote-model", "remote_model", HYBRID, {"metavar": "NAME"}),
    Flag("--remote-api-key-env", "remote_api_key_env", HYBRID, {"metavar": "VAR"}),
    Flag("--remote-price", "remote_price", HYBRID, {"metavar": "PRICE"}),
    Flag("--route-header", "route_header", HYBRID, {"metavar": "NAME"}),
    Flag("--route-remote-model", "route_remote_models", HYBRID, {"metavar": "NAME", "action": "append"}),
    Flag("--route-keyword", "route_keywords", HYBRID, {"metavar": "TEXT", "action": "append"}),
    Flag(
        "--fallback-to-remote",
        "fallback_to_remote",
        HYBRID,
        {"action": argparse.BooleanOptionalAction, "default": None},
    ),
    Flag("--ledger", "ledger_path", MEASURING, {"type": Path}),
    Flag("--power-source", "power_source", MEASURING, {"choices": ["auto", "nvml", "rapl", "none"]}),
    Flag(
        "--energy-exporter",
        "energy_exporters",
        MEASURING,
        {"metavar": "URL=EXPORTER_URL[#GPUS]", "action": "append"},
    ),
    Flag("--power-limit-w", "power_limit_w", MEASURING, {"type": float}),
    Flag("--idle-w", "idle_w", MEASURING, {"type": float}),
    Flag("--price-per-kwh", "price_per_kwh", MEASURING, {"type": float}),
    Flag("--currency", "currency", MEASURING),
    Flag("--usd-rate", "usd_rate", MEASURING, {"type": float}),
    Flag("--wall-power-factor", "wall_power_factor", MEASURING, {"type": float}),
    Flag(
        "--no-telemetry",
        "telemetry",
        MEASURING,
        {"dest": "telemetry", "action": "store_false", "default": None},
    ),
)


def default_text(setting: str) -> str | None:
    """The setting's default as the docs show it; None when the description says what happens."""
    info = Settings.model_fields[setting]
    default = info.get_default(call_default_factory=True)
    if default is None or default == [] or default == {}:
        return None
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, Path):
        return str(default).replace(str(Path.home()), "~", 1)
    if isinstance(default, list):
        return ", ".join(str(item) for item in default)
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def help_text(flag: Flag) -> str:
    """The setting's description, with its default (`--no-telemetry` reads the other way round)."""
    description = Settings.model_fields[flag.setting].description or ""
    if flag.name == "--no-telemetry":
        return "measure nothing (no metrics, stats, energy or ledger): only to benchmark the gateway"
    default = default_text(flag.setting)
    return description if default is None else f"{description} (default: {default})"


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str | None, Any] = {MAIN: parser}
    for flag in FLAGS:
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        groups[flag.group].add_argument(flag.name, help=help_text(flag), **flag.options)


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Settings fields for the flags a user actually passed."""
    return {flag.setting: getattr(args, flag.dest) for flag in FLAGS if getattr(args, flag.dest, None) is not None}


def option_rows() -> Iterator[tuple[str, str, str, str]]:
    """(flag, environment variable, default, meaning) for every flag, for the docs' table."""
    for flag in FLAGS:
        env = "STUDENT_" + flag.setting.upper()
        yield flag.name, env, default_text(flag.setting) or "–", help_text(flag)
