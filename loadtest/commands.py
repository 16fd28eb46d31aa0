"""The `student` command that drives load at a running gateway (see `server.runtime.cli`)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "load": ("loadtest.cli", "Locust scenarios: daily, capacity, soak, burst against a running gateway"),
}
