"""The `student` command that measures the gateway's own cost (see `server.runtime.cli`)."""

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("benchmarks.cli", "measure the gateway's own cost: student bench overhead"),
}
