"""Split a server-sent-events byte stream into whole events, as the bytes arrive.

TCP delivers vLLM's stream in arbitrary pieces; the gateway relays it one complete event at a
time (never holding back a finished event), so that telemetry can look at events, not bytes.
This runs once per upstream read, so the usual case (the read is exactly one `\\n\\n`-ended
event, as vLLM writes them) costs two byte searches and no copy.
"""

from __future__ import annotations

_SEPARATORS = (b"\n\n", b"\r\n\r\n")


class EventSplitter:
    """Feed it chunks; it returns each complete event (separator included) as soon as it is whole."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk if self._pending else chunk
        # Fast path: one LF-separated event, ending exactly at the end of the data.
        if 0 <= data.find(b"\n\n") == len(data) - 2 and b"\r" not in data:
            self._pending = b""
            return [data]
        events = []
        start = 0
        while (end := _event_end(data, start)) >= 0:
            events.append(data[start:end])
            start = end
        self._pending = data[start:]
        return events

    def flush(self) -> bytes:
        """Whatever trailing bytes never ended in a separator (empty for a well-formed stream)."""
        rest, self._pending = self._pending, b""
        return rest


def _event_end(data: bytes, start: int) -> int:
    """Index just past the first event separator at or after `start`, or -1."""
    best = -1
    for separator in _SEPARATORS:
        index = data.find(separator, start)
        if index >= 0 and (best < 0 or index + len(separator) < best):
            best = index + len(separator)
    return best
