"""Hybrid routing: the rules as a pure function, then real gateways over HTTP.

End to end, the "remote" is a second gateway-only `student serve` in front of the session's
vLLM, with an API key it really checks; the gateway under test fronts the same vLLM as its local
upstream. Where a request went is read from the answer's `X-Student-Route` header and from
both gateways' ledgers (the remote's rows carry the name of the key it was called with).
"""

from __future__ import annotations

import json
import threading
import unicodedata
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.accounting.ledger import RequestRow, daily_summary, read_requests
from server.accounting.ledger_report import build_report
from server.control.hybrid_routing import (
    DEFAULT_KEYWORDS,
    BadRouteHeaderError,
    LocalState,
    RouteDecision,
    RoutingRules,
    decide,
    question,
    response_headers,
)
from server.gateway.app import create_app
from server.runtime.settings import Settings
from server.telemetry.power_sources import SteadySource
from tests.support import (
    Stack,
    free_port,
    gateway_stats,
    http_get,
    running_stack,
    start_stack,
    uvicorn_in_thread,
    wait_for,
)

RULES = RoutingRules.of("X-Student-Route", ["remote", "deepseek-chat"], DEFAULT_KEYWORDS, fallback=True)
READY = LocalState(ready=True, at_capacity=False)


def chat_payload(content: object, model: str = "student", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


# --- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["remote", "REMOTE", " remote "])
def test_the_header_sends_remote_whatever_the_question(value: str) -> None:
    decision = decide(RULES, {"x-student-route": value}, chat_payload("Đơn hàng ở đâu?"), READY)
    assert decision == RouteDecision("remote", "header")


def test_an_explicit_local_header_wins_over_keywords_and_fallbacks() -> None:
    down = LocalState(ready=False, at_capacity=True)
    decision = decide(RULES, {"x-student-route": "local"}, chat_payload("Tại sao?", model="remote"), down)
    assert decision == RouteDecision("local", "header")


def test_a_header_that_is_not_a_route_is_refused() -> None:
    with pytest.raises(BadRouteHeaderError, match="must be 'local' or 'remote'"):
        decide(RULES, {"x-student-route": "cloud"}, chat_payload("hi"), READY)


def test_the_header_name_is_configurable() -> None:
    rules = RoutingRules.of("X-Tier", [], (), fallback=False)
    assert decide(rules, {"x-tier": "remote"}, None, READY) == RouteDecision("remote", "header")
    assert decide(rules, {"x-student-route": "remote"}, None, READY) == RouteDecision("local", "default")


@pytest.mark.parametrize("model", ["remote", "deepseek-chat"])
def test_a_model_name_that_means_remote(model: str) -> None:
    assert decide(RULES, {}, chat_payload("Đơn hàng ở đâu?", model=model), READY) == RouteDecision("remote", "model")


@pytest.mark.parametrize("keyword", DEFAULT_KEYWORDS)
def test_each_keyword_sends_remote_and_is_named_in_the_reason(keyword: str) -> None:
    decision = decide(RULES, {}, chat_payload(f"Cho tôi hỏi {keyword} hai sản phẩm này"), READY)
    assert decision == RouteDecision("remote", f"keyword:{keyword}")


@pytest.mark.parametrize(
    "text",
    [
        "TẠI SAO đơn của tôi bị hủy?",  # upper case
        "Tại Sao đơn của tôi bị hủy?",
        unicodedata.normalize("NFD", "tại sao đơn của tôi bị hủy?"),  # decomposed diacritics
    ],
)
def test_keywords_match_whatever_the_case_and_composition(text: str) -> None:
    assert decide(RULES, {}, chat_payload(text), READY) == RouteDecision("remote", "keyword:tại sao")


@pytest.mark.parametrize(
    "text",
    [
        "Đơn hàng #12345 của tôi đang ở đâu?",
        "tai sao don cua toi bi huy?",  # no diacritics: not the keyword as written
        "Tạị sao",  # other diacritics
        "",
    ],
)
def test_no_rule_matches_local(text: str) -> None:
    assert decide(RULES, {}, chat_payload(text), READY) == RouteDecision("local", "default")


def test_only_the_last_user_message_counts() -> None:
    payload = {
        "model": "student",
        "messages": [
            {"role": "system", "content": "Phân tích kỹ trước khi trả lời."},
            {"role": "user", "content": "Tại sao đơn bị hủy?"},
            {"role": "assistant", "content": "So sánh các lý do..."},
            {"role": "user", "content": "Cảm ơn, còn phí vận chuyển?"},
        ],
    }
    assert decide(RULES, {}, payload, READY) == RouteDecision("local", "default")
    payload["messages"][-1] = {"role": "user", "content": [{"type": "text", "text": "so sánh giúp tôi"}]}
    assert decide(RULES, {}, payload, READY) == RouteDecision("remote", "keyword:so sánh")


def test_the_question_of_a_completion_is_its_prompt() -> None:
    assert question({"prompt": "Phân tích giúp tôi"}) == "Phân tích giúp tôi"
    assert question({"prompt": ["a", "tại sao"]}) == "tại sao"
    assert question({"prompt": [1, 2, 3]}) == "" and question({}) == ""
    assert decide(RULES, {}, {"model": "student", "prompt": "Tại sao?"}, READY).reason == "keyword:tại sao"


def test_fallbacks_when_local_cannot_take_the_request() -> None:
    payload = chat_payload("Đơn hàng ở đâu?")
    not_ready = LocalState(ready=False, at_capacity=False)
    full = LocalState(ready=True, at_capacity=True)
    assert decide(RULES, {}, payload, not_ready) == RouteDecision("remote", "fallback:not-ready")
    assert decide(RULES, {}, payload, full) == RouteDecision("remote", "fallback:capacity")
    assert decide(RULES, {}, None, full) == RouteDecision("remote", "fallback:capacity")  # unreadable body
    no_fallback = RoutingRules.of("X-Student-Route", [], DEFAULT_KEYWORDS, fallback=False)
    assert decide(no_fallback, {}, payload, not_ready) == RouteDecision("local", "default")


def test_the_reason_header_is_latin_1_safe() -> None:
    headers = dict(response_headers(RouteDecision("remote", "keyword:tại sao")))
    assert headers[b"x-student-route"] == b"remote"
    assert unquote(headers[b"x-student-route-reason"].decode()) == "keyword:tại sao"


# --- real gateways --------------------------------------------------------------------------

CLOUD_KEY = "sk-cloud-0123456789abcdef"
PRICE = (2.0, 8.0)  # USD per 1M input, output tokens
HYBRID_ARGS = [
    "--remote-model", "student", "--remote-api-key-env", "CLOUD_KEY", "--remote-price", f"{PRICE[0]},{PRICE[1]}",
]  # fmt: skip


def send(
    url: str, body: dict, headers: dict[str, str] | None = None, path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, _lower(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, _lower(exc.headers.items()), exc.read()


def _lower(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {name.lower(): value for name, value in items}


def route_of(headers: dict[str, str]) -> tuple[str, str]:
    return headers["x-student-route"], unquote(headers["x-student-route-reason"])


@pytest.fixture(scope="module")
def remote(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stand-in cloud API: a gateway in front of the session's vLLM that wants its key."""
    with running_stack(
        ["--upstream", stack.vllm_url], tmp_path_factory.mktemp("remote") / "serve.log",
        env={"STUDENT_API_KEYS": f"cloud={CLOUD_KEY}"},
    ) as gateway:  # fmt: skip
        yield gateway


@pytest.fixture(scope="module")
def hybrid(stack: Stack, remote: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(
        ["--upstream", stack.vllm_url, "--remote-url", f"{remote.url}/v1", *HYBRID_ARGS],
        tmp_path_factory.mktemp("hybrid") / "serve.log", env={"CLOUD_KEY": CLOUD_KEY},
    ) as gateway:  # fmt: skip
        yield gateway


def remote_rows(remote: Stack) -> list[RequestRow]:
    return read_requests(remote.ledger_path)


def test_each_rule_sends_to_the_right_upstream(hybrid: Stack, remote: Stack) -> None:
    cases = [
        ({}, chat_payload("Đơn hàng #12345 của tôi đang ở đâu?"), ("local", "default")),
        ({"X-Student-Route": "remote"}, chat_payload("Đơn hàng #12345 của tôi đang ở đâu?"), ("remote", "header")),
        ({}, chat_payload("Chính sách đổi trả thế nào?", model="remote"), ("remote", "model")),
        ({}, chat_payload("Tại sao đơn hàng của tôi bị hủy?"), ("remote", "keyword:tại sao")),
        ({}, chat_payload("PHÂN TÍCH giúp tôi chính sách bảo hành"), ("remote", "keyword:phân tích")),
        ({}, chat_payload("So sánh hai gói vận chuyển", stream=True), ("remote", "keyword:so sánh")),
        ({"X-Student-Route": "local"}, chat_payload("Tại sao đơn hàng của tôi bị hủy?"), ("local", "header")),
    ]
    before = len(remote_rows(remote))
    for headers, body, expected in cases:
        status, answer_headers, answer = send(hybrid.url, {**body, "max_tokens": 4, "ignore_eos": True}, headers)
        assert status == 200, answer
        assert route_of(answer_headers) == expected, body
        if body.get("stream"):
            assert answer.rstrip().endswith(b"data: [DONE]")
        else:
            assert json.loads(answer)["usage"]["completion_tokens"] == 4

    sent_remote = [case for case in cases if case[2][0] == "remote"]
    new_remote = remote_rows(remote)[before:]
    assert len(new_remote) == len(sent_remote)  # the remote answered exactly those
    assert {(row.key_name, row.model, row.status) for row in new_remote} == {("cloud", "student", 200)}

    mine = read_requests(hybrid.ledger_path)[-len(cases) :]
    assert [(row.routed_to, row.route_reason) for row in mine] == [case[2] for case in cases]
    for row in mine:
        if row.routed_to == "remote":
            assert row.upstream == remote.url and row.energy_j is None
            assert row.remote_cost_usd == pytest.approx(
                (row.prompt_tokens * PRICE[0] + row.completion_tokens * PRICE[1]) / 1e6
            )
        else:
            assert row.upstream != remote.url and row.remote_cost_usd is None


def test_a_bad_route_header_is_a_400(hybrid: Stack) -> None:
    status, _, body = send(hybrid.url, chat_payload("hi", max_tokens=2), {"X-Student-Route": "cloud"})
    assert status == 400 and "local' or 'remote'" in json.loads(body)["error"]["message"]


def test_stats_show_the_remote_without_its_key(hybrid: Stack, remote: Stack) -> None:
    routes = gateway_stats(hybrid.url)["routes"]
    assert routes["remote"]["url"] == remote.url and routes["remote"]["model"] == "student"
    assert routes["remote"]["price"] == {"input_usd_per_mtok": PRICE[0], "output_usd_per_mtok": PRICE[1]}
    _, body = http_get(f"{hybrid.url}/stats")
    _, metrics = http_get(f"{hybrid.url}/metrics")
    for text in (body, metrics, hybrid.log().encode()):
        assert CLOUD_KEY.encode() not in text
    assert "key from $CLOUD_KEY" in hybrid.log()


def test_a_remote_that_is_down_gives_openai_shaped_errors(stack: Stack, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with running_stack(
        ["--upstream", stack.vllm_url, "--remote-url", dead, "--remote-model", "cloud", "--remote-price", "1"],
        tmp_path / "serve.log",
    ) as gateway:  # fmt: skip
        for stream in (False, True):
            status, headers, body = send(gateway.url, chat_payload("Tại sao?", max_tokens=2, stream=stream))
            error = json.loads(body)["error"]
            assert (status, error["type"], headers["retry-after"]) == (503, "service_unavailable", "5")
            assert "upstream unavailable" in error["message"] and route_of(headers)[0] == "remote"
        row = read_requests(gateway.ledger_path)[-1]
        assert (row.routed_to, row.upstream, row.status, row.remote_cost_usd) == ("remote", dead, 503, 0.0)


def test_missing_remote_model_or_key_stops_the_start_naming_the_setting(tmp_path: Path) -> None:
    cases = [
        ([], {}, "remote_model"),
        (
            ["--remote-model", "m", "--remote-price", "1", "--remote-api-key-env", "NO_SUCH_KEY_VAR"],
            {},
            "NO_SUCH_KEY_VAR",
        ),
        (["--remote-model", "m"], {}, "remote_price"),
    ]
    for args, env, named in cases:
        gateway = start_stack(["--upstream", "http://127.0.0.1:1", "--remote-url", "http://127.0.0.1:2", *args],
                              tmp_path / "serve.log", env)  # fmt: skip
        assert gateway.process.wait(60) == 1
        assert named in gateway.log() and "Traceback" not in gateway.log()


def test_fallback_to_remote_when_local_is_down(stack: Stack, remote: Stack, tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_stack(
        ["--upstream", dead, "--remote-url", remote.url, *HYBRID_ARGS], tmp_path / "serve.log", {"CLOUD_KEY": CLOUD_KEY}
    )
    try:
        # /ready checks the local replicas now: once it says 503, the local one is out.
        assert wait_for(lambda: _status(f"{gateway.url}/ready") == 503, 60), gateway.log()
        before = len(remote_rows(remote))
        status, headers, body = send(
            gateway.url, chat_payload("Đơn hàng của tôi đang ở đâu?", max_tokens=3, ignore_eos=True)
        )
        assert status == 200 and route_of(headers) == ("remote", "fallback:not-ready")
        assert json.loads(body)["usage"]["completion_tokens"] == 3
        assert len(remote_rows(remote)) == before + 1
        status, headers, _ = send(gateway.url, chat_payload("hi", max_tokens=3), {"X-Student-Route": "local"})
        assert status == 503 and route_of(headers) == ("local", "header")  # asked for local: local's answer
    finally:
        gateway.stop()


def test_fallback_to_remote_when_admission_would_refuse(stack: Stack, remote: Stack, tmp_path: Path) -> None:
    with running_stack(
        ["--upstream", stack.vllm_url, "--max-in-flight", "1", "--max-queue", "0", "--remote-url", remote.url,
         *HYBRID_ARGS], tmp_path / "serve.log", env={"CLOUD_KEY": CLOUD_KEY},
    ) as gateway:  # fmt: skip
        send(gateway.url, chat_payload("warm up", max_tokens=2))  # the model list is known: no stall below
        answers: dict[str, tuple[int, dict[str, str], bytes]] = {}

        def answer(name: str, body: dict, path: str = "/v1/chat/completions") -> threading.Thread:
            worker = threading.Thread(target=lambda: answers.setdefault(name, send(gateway.url, body, path=path)))
            worker.start()
            return worker

        long_body = {"model": "student", "prompt": "Xin chào", "max_tokens": 64, "ignore_eos": True}
        # The remote here is a gateway in front of the same vLLM: both answers wait for the engine.
        with stack.engine_paused():  # nothing finishes: the one slot stays taken while requests are decided
            workers = [answer("long", long_body, path="/v1/completions")]
            assert wait_for(lambda: gateway_stats(gateway.url)["admission"]["answering"] == 1, 30), gateway_stats(
                gateway.url
            )
            # Decided on arrival: a refusal is answered at once, a fallback goes to the remote.
            status, headers, body = send(gateway.url, chat_payload("hi", max_tokens=2), {"X-Student-Route": "local"})
            assert status == 429 and "at capacity" in json.loads(body)["error"]["message"]
            assert route_of(headers) == ("local", "header")  # asked for local: local's answer
            workers.append(answer("fallback", chat_payload("Đơn hàng của tôi đang ở đâu?", max_tokens=2)))
            assert wait_for(lambda: gateway_stats(remote.url)["requests"]["in_flight"] >= 1, 30), (
                "the remote never got it"
            )
        for worker in workers:
            worker.join(120)
        status, headers, _ = answers["fallback"]
        assert status == 200 and route_of(headers) == ("remote", "fallback:capacity")
        status, headers, body = answers["long"]
        assert status == 200 and route_of(headers) == ("local", "default")
        assert json.loads(body)["usage"]["completion_tokens"] == 64


def _status(url: str) -> int:
    try:
        return http_get(url, timeout_s=5)[0]
    except OSError:
        return 0


# --- per-route costs ------------------------------------------------------------------------


@pytest.fixture
def measured_hybrid(
    stack: Stack, remote: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Settings]]:
    """The real gateway in-process (a steady 100 W stand-in source, so local energy is measured),
    the session's vLLM as local and the remote gateway as remote."""
    monkeypatch.setenv("CLOUD_KEY", CLOUD_KEY)
    settings = Settings(
        upstream_url=stack.vllm_url, port=free_port(), ledger_path=tmp_path / "ledger.sqlite3", idle_w=20.0,
        remote_url=remote.url, remote_model="student", remote_api_key_env="CLOUD_KEY",
        remote_price=f"{PRICE[0]},{PRICE[1]}",
    )  # fmt: skip
    source = SteadySource(100.0, name="steady-test-source", reason="constant power for tests")
    with uvicorn_in_thread(create_app(settings, power_source=source), settings.port):
        yield f"http://127.0.0.1:{settings.port}", settings


def test_per_route_costs_add_up(measured_hybrid: tuple[str, Settings]) -> None:
    url, settings = measured_hybrid
    questions = ["Đơn hàng của tôi đang ở đâu?", "Tại sao đơn bị hủy?", "So sánh hai gói bảo hành"]
    for content in questions:
        for stream in (False, True):
            status, _, _ = send(url, chat_payload(content, max_tokens=6, stream=stream, ignore_eos=True))
            assert status == 200
    status, _, _ = send(url, {"model": "remote", "prompt": "Xin chào", "max_tokens": 5}, path="/v1/completions")
    assert status == 200

    rows = read_requests(settings.ledger_path)
    local = [row for row in rows if row.routed_to == "local"]
    remote = [row for row in rows if row.routed_to == "remote"]
    assert (len(local), len(remote)) == (2, 5)
    assert all(row.energy_j is not None and row.energy_j > 0 and row.remote_cost_usd is None for row in local)
    assert all(row.energy_j is None and row.electricity_cost is None for row in remote)
    remote_usd = sum((row.prompt_tokens * PRICE[0] + row.completion_tokens * PRICE[1]) / 1e6 for row in remote)
    assert remote_usd > 0 and sum(row.remote_cost_usd for row in remote) == pytest.approx(remote_usd)

    routes = gateway_stats(url)["routes"]
    assert routes["local"]["requests"]["total"] == 2 and routes["remote"]["requests"]["total"] == 5
    assert routes["remote"]["reasons"] == {"keyword:so sánh": 2, "keyword:tại sao": 2, "model": 1}
    assert routes["local"]["energy_j"] == pytest.approx(sum(row.energy_j for row in local))
    assert routes["local"]["cost"]["electricity"] == pytest.approx(sum(row.electricity_cost for row in local))
    assert routes["remote"]["cost"]["usd"] == pytest.approx(remote_usd)
    assert routes["remote"]["tokens"] == {
        "prompt": sum(row.prompt_tokens for row in remote), "completion": sum(row.completion_tokens for row in remote)
    }  # fmt: skip

    _, text = http_get(f"{url}/metrics")
    samples = [s for family in text_string_to_metric_families(text.decode()) for s in family.samples]
    cost = {s.labels["routed_to"]: s.value for s in samples if s.name == "student_route_cost_usd_total"}
    assert cost["remote"] == pytest.approx(remote_usd)
    assert cost["local"] == pytest.approx(routes["local"]["cost"]["usd"])

    report = build_report(daily_summary(settings.ledger_path, 0.0))
    assert report.total.routes["remote"].cost_usd == pytest.approx(remote_usd)
    assert report.total.routes["local"].requests == 2 and report.total.remote_cost_usd == pytest.approx(remote_usd)
