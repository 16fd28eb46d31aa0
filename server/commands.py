"""The `student` commands that run and account the serving stack (see `server.runtime.cli`)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.runtime.serve", "run vLLM and the measuring gateway (demo student if no --model)"),
    "report": (
        "server.accounting.ledger_report",
        "daily table of requests, tokens, kWh, electricity and API-equivalent cost from the ledger",
    ),
    "gpu-check": (
        "server.gpu_check.runner",
        "check the energy meter (NVML) and merge/train-lora on a real NVIDIA GPU (table, JSON; exit 1 if one fails)",
    ),
}
