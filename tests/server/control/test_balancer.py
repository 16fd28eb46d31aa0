"""Several replicas: the balancing rule and ejection (unit), then two real vLLM replicas (end to end).

The unit tests drive `Balancer` with a probe that returns chosen health results and a clock the
test moves; `health_probe` is tested against a real HTTP server. The end-to-end tests run a
gateway in front of the session's vLLM and a second vLLM started here by the project's own
`VllmSupervisor`, then kill the second one and watch it leave and come back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web

from server.control.balancer import Balancer, NoHealthyReplicaError, Replica, Unhealthy, health_probe
from server.runtime.settings import Settings
from server.runtime.vllm_supervisor import VllmSupervisor
from tests.support import Stack, engine_core, free_port, http_get, post_json, start_stack, wait_for

A, B, C = "http://a:8001", "http://b:8001", "http://c:8001"


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class Health:
    """The probe's answers: None (HTTP 200) unless a replica is set to fail (a reason: a certain
    failure, like a refused connection; or an `Unhealthy`)."""

    def __init__(self) -> None:
        self.problems: dict[str, str | Unhealthy] = {}
        self.probed: list[str] = []

    async def __call__(self, base_url: str) -> Unhealthy | None:
        self.probed.append(base_url)
        problem = self.problems.get(base_url)
        return Unhealthy(problem) if isinstance(problem, str) else problem


def balancer(*urls: str, clock: Clock | None = None, health: Health | None = None, **kwargs) -> Balancer:
    return Balancer(urls or (A, B), health or Health(), clock=clock or Clock(), **kwargs)


def by_url(balancer: Balancer) -> dict[str, Replica]:
    return {replica.base_url: replica for replica in balancer.replicas}


# --- balancing ------------------------------------------------------------------------------


def test_least_outstanding_requests_wins() -> None:
    lb = balancer(A, B, C)
    first, second, third = lb.pick(), lb.pick(), lb.pick()
    assert {first.base_url, second.base_url, third.base_url} == {A, B, C}
    lb.release(second, 200)
    assert lb.pick() is second  # the only one with nothing in flight
    assert [r.outstanding for r in lb.replicas] == [1, 1, 1]


def test_equal_replicas_take_turns() -> None:
    lb = balancer(A, B, C)
    chosen = []
    for _ in range(6):
        replica = lb.pick()
        chosen.append(replica.base_url)
        lb.release(replica, 200)
    assert sorted(chosen) == sorted([A, B, C] * 2)
    assert [r.requests for r in lb.replicas] == [2, 2, 2]


def test_a_single_replica_is_always_picked() -> None:
    lb = balancer(A)
    replicas = [lb.pick() for _ in range(3)]
    assert all(replica.base_url == A for replica in replicas)
    assert lb.replicas[0].outstanding == 3


def test_pick_can_exclude_replicas_already_tried() -> None:
    lb = balancer(A, B)
    a = by_url(lb)[A]
    assert lb.pick(exclude=[a]).base_url == B
    with pytest.raises(NoHealthyReplicaError):
        lb.pick(exclude=lb.replicas)


def test_a_balancer_needs_an_upstream() -> None:
    with pytest.raises(ValueError):
        Balancer([], Health())


# --- passive ejection (request failures) ------------------------------------------------------


def fail(lb: Balancer, replica: Replica, status: int = 502, times: int = 1) -> None:
    for _ in range(times):
        replica.outstanding += 1  # as if picked
        lb.release(replica, status)


def test_three_failures_in_a_row_eject_a_replica_and_traffic_moves(caplog: pytest.LogCaptureFixture) -> None:
    lb = balancer(A, B)
    a = by_url(lb)[A]
    with caplog.at_level(logging.WARNING, logger="server.control.balancer"):
        fail(lb, a, 503, times=2)
        assert a.healthy
        fail(lb, a, 504)
    assert not a.healthy and a.reason == f"upstream {A}: 3 requests in a row failed"
    assert [record.getMessage() for record in caplog.records] == [f"replica {A} ejected: {a.reason}"]
    assert all(lb.pick().base_url == B for _ in range(4))
    assert (a.requests, a.failures) == (0, 3)


def test_a_success_clears_the_count_and_client_errors_say_nothing() -> None:
    lb = balancer(A, B)
    a = by_url(lb)[A]
    fail(lb, a, 502, times=2)
    fail(lb, a, 499)  # the client left: no verdict
    fail(lb, a, 400)
    assert a.consecutive_failures == 2 and a.healthy
    fail(lb, a, 200)
    fail(lb, a, 502, times=2)
    assert a.healthy and a.consecutive_failures == 2


def test_a_refused_connection_ejects_at_once() -> None:
    lb = balancer(A, B)
    a = lb.pick()
    lb.release(a, 503, refused=True)
    assert not a.healthy and "refused a connection" in a.reason


def test_request_failures_never_eject_the_last_healthy_replica() -> None:
    lb = balancer(A)
    a = lb.replicas[0]
    fail(lb, a, 503, times=10)
    a.outstanding += 1
    lb.release(a, 503, refused=True)
    assert a.healthy and a.failures == 11
    assert lb.pick() is a


def test_with_one_of_two_ejected_the_other_is_never_ejected_by_failures() -> None:
    lb = balancer(A, B)
    a, b = lb.replicas
    fail(lb, a, times=3)
    fail(lb, b, times=5)
    assert (a.healthy, b.healthy) == (False, True)


def test_a_replica_ejected_by_failures_returns_after_the_cooldown_on_probation() -> None:
    clock, health = Clock(), Health()
    lb = balancer(A, B, clock=clock, health=health, cooldown_s=10.0)
    a = by_url(lb)[A]
    fail(lb, a, times=3)
    asyncio.run(lb.check_health())  # /health says 200, but the cool-down is not over
    assert not a.healthy
    clock.now_s += 10.0
    asyncio.run(lb.check_health())
    assert a.healthy and a.reason is None
    fail(lb, a)  # on probation: one more failure and it is out again
    assert not a.healthy
    clock.now_s += 10.0
    asyncio.run(lb.check_health())
    fail(lb, a, 200)  # a success ends the probation
    fail(lb, a, times=2)
    assert a.healthy


def test_a_replica_ejected_by_failures_stays_out_while_its_health_check_fails() -> None:
    clock, health = Clock(), Health()
    lb = balancer(A, B, clock=clock, health=health, cooldown_s=1.0)
    a = by_url(lb)[A]
    fail(lb, a, times=3)
    clock.now_s += 5.0
    reason = health.problems[A] = f"upstream {A} unreachable: refused"
    asyncio.run(lb.check_health())
    assert not a.healthy and a.reason == reason  # the latest reason


# --- health checks ----------------------------------------------------------------------------


def test_a_failed_health_check_ejects_even_the_only_replica_and_ready_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    health = Health()
    lb = balancer(A, health=health)
    reason = health.problems[A] = f"upstream {A} unreachable: connection refused"
    with caplog.at_level(logging.INFO, logger="server.control.balancer"):
        assert asyncio.run(lb.check_ready()) == reason
        asyncio.run(lb.check_health())  # still failing: no second log line
        with pytest.raises(NoHealthyReplicaError, match="connection refused"):
            lb.pick()
        del health.problems[A]
        assert asyncio.run(lb.check_ready()) is None
    assert lb.pick().base_url == A
    assert [record.getMessage() for record in caplog.records] == [
        f"replica {A} ejected: {reason}",
        f"replica {A} back: /health answers 200 again",
    ]


def test_health_check_timeouts_eject_only_when_three_come_in_a_row() -> None:
    health = Health()
    lb = balancer(A, health=health)
    a = lb.replicas[0]
    slow = health.problems[A] = Unhealthy(f"upstream {A} did not answer /health in 2 s", certain=False)
    for _ in range(2):
        asyncio.run(lb.check_health())
    assert a.healthy  # a busy machine may stall a check or two
    del health.problems[A]
    asyncio.run(lb.check_health())  # an answer clears the count
    health.problems[A] = slow
    for _ in range(2):
        assert asyncio.run(lb.check_ready()) is None
    assert asyncio.run(lb.check_ready()) == slow.reason
    assert not a.healthy


def test_ready_while_one_replica_is_healthy_and_the_reasons_of_all_when_none_is() -> None:
    health = Health()
    lb = balancer(A, B, health=health)
    health.problems[A] = "a is down"
    assert asyncio.run(lb.check_ready()) is None
    health.problems[B] = "b is down"
    assert asyncio.run(lb.check_ready()) == "a is down; b is down"
    assert sorted(health.probed) == sorted([A, B, A, B])


def test_status_lists_every_replica() -> None:
    health = Health()
    lb = balancer(A, B, health=health)
    lb.pick()
    health.problems[B] = "b is down"
    asyncio.run(lb.check_health())
    assert lb.status() == [
        {"url": A, "healthy": True, "outstanding": 1, "requests": 1, "failures": 0, "reason": None},
        {"url": B, "healthy": False, "outstanding": 0, "requests": 0, "failures": 0, "reason": "b is down"},
    ]


def test_health_checks_run_until_cancelled() -> None:
    health = Health()
    lb = balancer(A, B, health=health)
    health.problems[B] = "b is down"

    async def scenario() -> None:
        task = asyncio.create_task(lb.run_health_checks(0.01))
        await asyncio.sleep(0.05)
        assert not by_url(lb)[B].healthy
        del health.problems[B]
        await asyncio.sleep(0.05)
        assert by_url(lb)[B].healthy
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(health.probed) >= 8


@pytest.fixture(scope="module")
def health_server() -> Iterator[tuple[str, dict[str, int]]]:
    """A real HTTP server whose /health answers the status in `state["status"]`."""
    state = {"status": 200, "delay_s": 0}
    port = free_port()
    loop = asyncio.new_event_loop()

    async def health(request: web.Request) -> web.Response:
        await asyncio.sleep(state["delay_s"])
        return web.Response(status=state["status"])

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_health_probe_over_real_http(health_server: tuple[str, dict[str, int]]) -> None:
    url, state = health_server
    dead = f"http://127.0.0.1:{free_port()}"

    async def probe_all() -> list[Unhealthy | None]:
        async with aiohttp.ClientSession() as session:
            probe = health_probe(session, timeout_s=0.5)
            results = [await probe(url)]
            state["status"] = 503
            results.append(await probe(url))
            state["status"], state["delay_s"] = 200, 1
            results.append(await probe(url))
            state["delay_s"] = 0
            results.append(await probe(dead))
            return results

    ok, busy, slow, refused = asyncio.run(probe_all())
    assert ok is None
    assert busy == Unhealthy(f"upstream {url} /health answered HTTP 503")
    assert slow == Unhealthy(f"upstream {url} did not answer /health in 0.5 s", certain=False)
    assert refused.certain and refused.reason.startswith(f"upstream {dead} unreachable:")


# --- end to end: two real vLLM replicas ---------------------------------------------------------

# Held in flight by a frozen engine, not by its length (the test aborts it when done).
LONG = {"model": "student", "prompt": "Xin chào", "max_tokens": 256, "ignore_eos": True, "stream": True}
SHORT = {"model": "student", "prompt": "hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def second_vllm(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmSupervisor]:
    """A second vLLM on the tiny model, run (and restarted after a crash) by the project's supervisor.

    Only started here: `pair` waits for it, after asking for the session's stack (which then
    boots alongside it when this module runs first).
    """
    settings = Settings(
        vllm_port=free_port(),
        device="cpu",
        dtype="float32",
        max_model_len=4096,
        max_num_seqs=2,
        kv_cache_gib=1,
        vllm_extra_args=["--enforce-eager"],  # as STACK_ARGS
    )
    log = (tmp_path_factory.mktemp("second-vllm") / "vllm.log").open("w")
    supervisor = VllmSupervisor(settings, tiny_model_dir, log_stream=log)
    try:
        supervisor.start()
        yield supervisor
    finally:
        supervisor.stop()
        log.close()


@dataclass
class Pair:
    gateway: Stack
    first_url: str  # the session stack's vLLM
    second_url: str  # `second_vllm`
    roots: dict[str, int]  # replica URL -> pid of a process above its vLLM engine


@pytest.fixture(scope="module")
def pair(
    second_vllm: VllmSupervisor, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pair]:
    """A gateway (no vLLM of its own) in front of the session's vLLM and the second one."""
    stack: Stack = request.getfixturevalue("stack")  # not a parameter: pytest would set it up first
    second_vllm.wait_ready(300)
    second_url = second_vllm.health_url.removesuffix("/health")
    gateway = start_stack(
        ["--upstream", stack.vllm_url, "--upstream", second_url],
        tmp_path_factory.mktemp("pair") / "serve.log",
        env={"STUDENT_HEALTH_CHECK_INTERVAL_S": "0.5"},
    )
    try:
        gateway.wait_ready(60)
        roots = {stack.vllm_url: stack.process.pid, second_url: second_vllm.pid}
        yield Pair(gateway, stack.vllm_url, second_url, roots)
    finally:
        gateway.stop()


def replicas(gateway: Stack) -> dict[str, dict]:
    """`/stats`' per-replica block by URL (a generous timeout: a long stream on two cores is slow)."""
    return {entry["url"]: entry for entry in json.loads(http_get(f"{gateway.url}/stats", timeout_s=30)[1])["upstreams"]}


def served(gateway: Stack) -> dict[str, int]:
    return {url: entry["requests"]["ok"] for url, entry in replicas(gateway).items()}


def test_requests_spread_over_both_replicas(pair: Pair) -> None:
    gateway, first_url, second_url = pair.gateway, pair.first_url, pair.second_url
    before = served(gateway)
    for _ in range(6):
        status, answer = post_json(f"{gateway.url}/v1/completions", SHORT)
        assert status == 200, answer
    after = served(gateway)
    assert after[first_url] - before[first_url] == 3
    assert after[second_url] - before[second_url] == 3
    rows = sqlite3.connect(gateway.ledger_path).execute("SELECT upstream, COUNT(*) FROM requests GROUP BY upstream")
    assert {url for url, count in rows if count > 0} == {first_url, second_url}
    status, body = http_get(f"{gateway.url}/ready")
    assert status == 200 and [r["url"] for r in json.loads(body)["replicas"]] == [first_url, second_url]
    metrics = http_get(f"{gateway.url}/metrics")[1].decode()
    assert f'student_upstream_healthy{{upstream="{second_url}"}} 1.0' in metrics


def test_a_request_goes_to_the_less_loaded_replica(pair: Pair) -> None:
    gateway = pair.gateway
    seen: dict[str, dict] = {}

    def one_busy() -> bool:
        seen.update(replicas(gateway))
        return sorted(entry["outstanding"] for entry in seen.values()) == [0, 1]

    # Both engines frozen: the long answer cannot finish before it is seen, however fast the box.
    engines = {url: engine_below(root) for url, root in pair.roots.items()}
    for engine in engines.values():
        engine.suspend()
    try:
        with Streaming(gateway, LONG):  # one answer held in flight keeps one replica busy
            assert wait_for(one_busy, 30), seen
            busy = next(url for url, entry in seen.items() if entry["outstanding"] == 1)
            idle = next(url for url in engines if url != busy)
            engines[idle].resume()  # the busy one stays frozen, leaving the two cores to the other
            before = served(gateway)
            for _ in range(3):
                assert post_json(f"{gateway.url}/v1/completions", SHORT)[0] == 200
            after = replicas(gateway)
        assert after[busy]["outstanding"] == 1
    finally:
        for engine in engines.values():
            engine.resume()
    assert after[busy]["requests"]["ok"] == before[busy]  # all three went to the idle replica
    assert sum(entry["requests"]["ok"] for entry in after.values()) - sum(before.values()) == 3


def test_a_killed_replica_is_ejected_then_returns_when_healthy(pair: Pair, second_vllm: VllmSupervisor) -> None:
    gateway, first_url, second_url = pair.gateway, pair.first_url, pair.second_url
    assert second_vllm.pid is not None
    os.killpg(second_vllm.pid, signal.SIGKILL)  # API server and engine; the supervisor restarts them
    # Requests keep succeeding at once: one refused at connect goes to the other replica.
    for _ in range(4):
        status, answer = post_json(f"{gateway.url}/v1/completions", SHORT)
        assert status == 200, answer
    assert wait_for(lambda: not replicas(gateway)[second_url]["healthy"], 10), replicas(gateway)
    entry = replicas(gateway)[second_url]
    assert entry["reason"] and second_url in entry["reason"], entry
    assert http_get(f"{gateway.url}/ready")[0] == 200
    assert f"replica {second_url} ejected" in gateway.log()
    before = served(gateway)
    for _ in range(3):
        assert post_json(f"{gateway.url}/v1/completions", SHORT)[0] == 200
    assert served(gateway)[first_url] - before[first_url] == 3

    # The supervisor starts it again; the gateway takes it back once its /health answers 200.
    assert wait_for(lambda: replicas(gateway)[second_url]["healthy"], 240, interval_s=1), gateway.log()[-3000:]
    assert f"replica {second_url} back" in gateway.log()
    before = served(gateway)
    for _ in range(4):
        assert post_json(f"{gateway.url}/v1/completions", SHORT)[0] == 200
    assert served(gateway)[second_url] - before[second_url] >= 1


def engine_below(root_pid: int) -> psutil.Process:
    """The vLLM engine process under `root_pid`: suspended, its HTTP server keeps answering."""
    return engine_core(psutil.Process(root_pid).children(recursive=True))


class Streaming:
    """A streaming request held open (reading its events in a thread) for the `with` block."""

    def __init__(self, gateway: Stack, body: dict):
        self._sock = socket.create_connection(("127.0.0.1", gateway.port))
        data = json.dumps(body).encode()
        self._sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        self._reader = threading.Thread(target=self._drain, daemon=True)

    def _drain(self) -> None:
        try:
            while self._sock.recv(65536):
                pass
        except OSError:
            pass

    def __enter__(self) -> Streaming:
        self._reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._sock.close()  # the gateway aborts the answer upstream
        self._reader.join(5)
