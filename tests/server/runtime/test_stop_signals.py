"""The stop-signal rules of `student serve`, on the handler itself (the processes: test_serve)."""

from __future__ import annotations

import os
import signal

import pytest

from server.runtime.stop_signals import EXIT_CODES, StopSignals


class FakeServer:
    def __init__(self) -> None:
        self.should_exit = False
        self.cuts = 0

    def cut_drain(self) -> None:
        self.cuts += 1


@pytest.fixture
def stop() -> StopSignals:
    read_end, write_end = os.pipe()
    os.close(read_end)  # notes go nowhere (a closed pipe: the write fails, quietly)
    handlers = StopSignals(stderr_fd=write_end)
    yield handlers
    os.close(write_end)


def test_exit_codes_are_the_shell_conventions() -> None:
    assert EXIT_CODES == {signal.SIGINT: 130, signal.SIGTERM: 0}


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGTERM), (signal.SIGTERM, signal.SIGINT)])
def test_the_first_signal_decides_the_exit_code(
    stop: StopSignals, first: signal.Signals, second: signal.Signals
) -> None:
    assert stop.exit_code is None and not stop.requested.is_set()
    stop.handle(first)
    stop.handle(second)
    assert stop.exit_code == EXIT_CODES[first]
    assert stop.requested.is_set()


def test_a_signal_before_the_gateway_runs_stops_it_when_attached(stop: StopSignals) -> None:
    stop.handle(signal.SIGTERM)
    server = FakeServer()
    stop.attach(server)  # a stand-in with the two attributes StopSignals uses
    assert server.should_exit and server.cuts == 0


def test_while_serving_the_first_signal_drains_and_a_second_ctrl_c_cuts_the_drain(stop: StopSignals) -> None:
    server = FakeServer()
    stop.attach(server)
    assert not server.should_exit
    stop.handle(signal.SIGTERM)
    assert server.should_exit and server.cuts == 0
    stop.handle(signal.SIGTERM)
    assert server.cuts == 0
    stop.handle(signal.SIGINT)
    assert server.cuts == 1
    assert stop.exit_code == 0


def test_handlers_are_installed_and_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop.handle
        assert signal.getsignal(signal.SIGINT) == stop.handle
    assert signal.getsignal(signal.SIGTERM) is before
