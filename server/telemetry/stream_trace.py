"""Per-event timing of streams inside the gateway, for finding where a first token waits.

A client sees a stream's first token late either because the upstream sent it late, or because
the gateway read or wrote it late (a busy or blocked event loop lets the upstream's events pile
up in the kernel's buffer, and they then leave in one read, as a burst). Only timestamps taken on
both sides of the gateway tell the two apart, for each request.

With `STUDENT_STREAM_TRACE_PATH` set, every streamed request appends one JSON line there when it
ends: the times (ms since the gateway received the request) when the request was sent upstream,
when the upstream's response headers arrived, and, for every upstream read, when its bytes were
read, how many bytes and events it held, and when they had been written to the client's socket.
Off by default: it is a diagnostic, and writing a line per request costs the event loop time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

MS_PER_S = 1000.0


@dataclass
class StreamTiming:
    """One stream's times, monotonic seconds; `reads` holds (read_s, bytes, events, written_s)."""

    received_s: float
    sent_s: float | None = None
    headers_s: float | None = None
    reads: list[tuple[float, int, int, float]] = field(default_factory=list)

    def read(self, read_s: float, size: int, events: int) -> None:
        """An upstream read came at `read_s`; its events have just been written to the client."""
        self.reads.append((read_s, size, events, time.monotonic()))

    def as_json(self, request_id: int, status: int | None) -> dict[str, object]:
        """Milliseconds since the request was received, rounded to µs."""

        def ms(moment_s: float | None) -> float | None:
            return None if moment_s is None else round((moment_s - self.received_s) * MS_PER_S, 3)

        return {
            "request_id": request_id,
            "status": status,
            "sent_ms": ms(self.sent_s),
            "headers_ms": ms(self.headers_s),
            "reads": [[ms(read_s), size, events, ms(written_s)] for read_s, size, events, written_s in self.reads],
        }


class StreamTrace:
    """Appends each finished stream's timing to a JSON-lines file (one writer: the event loop)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a", encoding="utf-8")

    def write(self, timing: StreamTiming, request_id: int, status: int | None) -> None:
        self._file.write(json.dumps(timing.as_json(request_id, status)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
