"""Ctrl-C and SIGTERM for `student serve`: the first stop signal decides the exit code.

SIGINT exits 130 (128 + 2, what shells report for an interrupted program) and SIGTERM exits 0
(an orderly stop a supervisor asked for), after the same path whenever the signal lands: a
start-up in progress is abandoned, a running gateway stops accepting and lets its answers in
flight finish (up to the drain timeout), and vLLM is stopped last.

uvicorn has signal handling of its own, which re-raises the signal once it has shut down; what
that re-raise turns into depends on when the signal landed, so the same Ctrl-C sometimes exited
0 and sometimes 130. Here the handlers are installed once around the whole run and uvicorn's
are switched off (`GatewayServer`).

Later signals never change the exit code. A second SIGINT while answers drain stops waiting for
them: they are cancelled (recorded as cut, 499) and the shutdown goes on, the ledger and power
limits included. A second SIGTERM changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
from collections.abc import Generator
from types import FrameType, TracebackType

import uvicorn

EXIT_CODES: dict[signal.Signals, int] = {signal.SIGINT: 130, signal.SIGTERM: 0}
EXIT_CODES_HELP = (
    "exit codes: 0 stopped by SIGTERM (after draining answers in flight); 130 stopped by Ctrl-C "
    "(SIGINT, same drain; a second Ctrl-C cuts the drain short); 1 could not start (bad option, "
    "busy port, missing model, vLLM failed to start). The first signal decides, whenever it lands."
)


class GatewayServer(uvicorn.Server):
    """uvicorn without its own signal handlers; `StopSignals` drives `should_exit` instead."""

    _loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def cut_drain(self) -> None:
        """Cancel the answers still in flight, as uvicorn does when the drain timeout passes."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._cancel_tasks)

    def _cancel_tasks(self) -> None:
        for task in list(self.server_state.tasks):
            task.cancel(msg="a second Ctrl-C cut the drain short")


class StopSignals:
    """Handlers for SIGINT and SIGTERM from `__enter__` to `__exit__` (main thread only).

    `requested` is set by the first signal, so start-up waits can end at once; `attach` hands
    over the gateway, whose `should_exit` the handlers set from then on.
    """

    def __init__(self, stderr_fd: int = 2) -> None:
        self.first: signal.Signals | None = None
        self.requested = threading.Event()
        self._stderr_fd = stderr_fd
        self._server: GatewayServer | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in EXIT_CODES:
            self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]  # whatever signal.signal returned

    @property
    def exit_code(self) -> int | None:
        """130 after SIGINT, 0 after SIGTERM, None when no stop signal came."""
        return None if self.first is None else EXIT_CODES[self.first]

    def attach(self, server: GatewayServer) -> None:
        """From now on a signal stops `server`; one that already came stops it before it serves."""
        self._server = server
        if self.first is not None:
            server.should_exit = True

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The signal handler: record the first signal, stop the gateway or the start-up."""
        sig = signal.Signals(signum)
        server = self._server
        if self.first is None:
            self.first = sig
            self.requested.set()
            self._note(f"{sig.name} received: stopping (exit code {EXIT_CODES[sig]})")
            if server is not None:
                server.should_exit = True
        elif sig == signal.SIGINT and server is not None:
            self._note("second Ctrl-C: cancelling the answers still in flight")
            server.cut_drain()
        else:
            self._note(f"{sig.name} received: already stopping")

    def _note(self, message: str) -> None:
        """One line on stderr by a plain write(2): a print here could land inside another print
        of the main thread, which Python refuses (reentrant call) with an exception."""
        with contextlib.suppress(OSError):
            os.write(self._stderr_fd, f"[student] {message}\n".encode())
