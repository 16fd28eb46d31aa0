from __future__ import annotations

import json

import pytest

from server.telemetry.request_record import (
    RequestRecord,
    StreamObserver,
    UsageWish,
    describe,
    request_usage_in_stream,
    take_usage_from_body,
)

ROLE = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
TOKEN = b'data: {"choices": [{"index": 0, "delta": {"content": "xin"}}]}\n\n'
TEXT = b'data: {"choices": [{"index": 0, "text": " ch\\u00e0o"}]}\n\n'
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}\n\n'
DONE = b"data: [DONE]\n\n"


def record(**kwargs: object) -> RequestRecord:
    return RequestRecord("/v1/chat/completions", "http://up", True, **kwargs)


def test_streams_ask_upstream_for_usage_keeping_other_options() -> None:
    body, wish = request_usage_in_stream({"stream": True, "stream_options": {"continuous_usage_stats": False}})
    assert wish == UsageWish(include_usage=False, continuous_usage_stats=False)
    assert json.loads(body)["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


def test_a_client_that_asked_for_usage_is_sent_unchanged() -> None:
    body, wish = request_usage_in_stream({"stream": True, "stream_options": {"include_usage": True}})
    assert (body, wish) == (None, UsageWish(True, False))


def test_measuring_energy_asks_for_usage_on_every_chunk() -> None:
    body, wish = request_usage_in_stream({"stream": True, "model": "m"}, continuous=True)
    assert json.loads(body) == {
        "stream": True,
        "model": "m",
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    assert not wish.continuous


@pytest.mark.parametrize("wants_usage", [False, True])
def test_observer_records_first_content_and_usage_and_drops_unasked_usage(wants_usage: bool) -> None:
    rec = record(started_s=100.0)
    observer = StreamObserver(rec, UsageWish(wants_usage, False))
    kept = [event for event in (ROLE, TOKEN, TEXT, USAGE, DONE) if observer.keep(event)]
    assert (rec.prompt_tokens, rec.completion_tokens) == (12, 5)
    assert rec.first_token_s is not None and rec.first_token_s > rec.started_s
    expected = [ROLE, TOKEN, TEXT, USAGE, DONE] if wants_usage else [ROLE, TOKEN, TEXT, DONE]
    assert kept == expected


# Real vLLM 0.32 events (chat, max_tokens 2) with stream_options include_usage + continuous_usage_stats,
# and the same answer's events as vLLM sends them with include_usage only.
CONTINUOUS = [
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[{"index":0,'
    '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"usage":{"prompt_tokens":22,'
    '"total_tokens":22,"completion_tokens":0,"completion_tokens_details":null},"prompt_token_ids":null,"prompt_text":null}',
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[{"index":0,'
    '"delta":{"content":"Cử"},"logprobs":null,"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":22,'
    '"total_tokens":23,"completion_tokens":1,"completion_tokens_details":null}}',
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[{"index":0,'
    '"delta":{"content":"~"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}],'
    '"usage":{"prompt_tokens":22,"total_tokens":24,"completion_tokens":2,"completion_tokens_details":null}}',
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[],"usage":'
    '{"prompt_tokens":22,"total_tokens":24,"completion_tokens":2},"system_fingerprint":"vllm-0.32.0-8a25011c"}',
    "data: [DONE]",
]
INCLUDE_ONLY = [
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[{"index":0,'
    '"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],"prompt_token_ids":null,'
    '"prompt_text":null}',
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[{"index":0,'
    '"delta":{"content":"Cử"},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
    'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"student","choices":[{"index":0,'
    '"delta":{"content":"~"},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}',
    CONTINUOUS[3],
    "data: [DONE]",
]


def events(lines: list[str]) -> list[bytes]:
    return [line.encode() + b"\n\n" for line in lines]


@pytest.mark.parametrize(
    ("wish", "expected"),
    [
        (UsageWish(False, False), events(INCLUDE_ONLY[:3] + INCLUDE_ONLY[4:])),
        (UsageWish(True, False), events(INCLUDE_ONLY)),
        (UsageWish(True, True), events(CONTINUOUS)),
    ],
)
def test_running_usage_feeds_the_meter_and_is_removed_unless_asked(wish: UsageWish, expected: list[bytes]) -> None:
    reported: list[int] = []
    rec = record()
    observer = StreamObserver(rec, wish, reported.append)
    kept = [out for event in events(CONTINUOUS) if (out := observer.keep(event)) is not None]
    assert kept == expected  # byte for byte what vLLM itself sends for the client's own options
    assert reported == [22, 1, 1]  # prompt tokens at prefill, then each output token
    assert (rec.prompt_tokens, rec.completion_tokens) == (22, 2)


def test_an_empty_role_chunk_is_not_the_first_token() -> None:
    rec = record()
    StreamObserver(rec, UsageWish(False, False)).keep(ROLE)
    assert rec.first_token_s is None


def test_latencies_follow_vllm_benchmark_definitions() -> None:
    rec = record(started_s=10.0, first_token_s=10.25, finished_s=11.25, completion_tokens=5)
    assert rec.ttft_ms == pytest.approx(250.0)
    assert rec.e2e_ms == pytest.approx(1250.0)
    assert rec.tpot_ms == pytest.approx(1000.0 / 4)
    assert record(started_s=1.0, first_token_s=1.1, finished_s=1.2, completion_tokens=1).tpot_ms is None


def test_non_streaming_usage_comes_from_the_body() -> None:
    rec = record()
    take_usage_from_body(rec, b'{"usage": {"prompt_tokens": 3, "completion_tokens": 9}}')
    take_usage_from_body(rec, b"not json")
    assert (rec.prompt_tokens, rec.completion_tokens) == (3, 9)


def test_describe_names_units_and_marks_missing_values() -> None:
    line = describe(record(started_s=0.0, finished_s=0.5, status=200, prompt_tokens=3, completion_tokens=1))
    assert "status=200" in line and "prompt_tokens=3" in line and "ttft_ms=- tpot_ms=- e2e_ms=500.0" in line


NESTED = (
    'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"\\"usage\\":{} và \\"choices\\":[]"}}],'
    '"usage":{"prompt_tokens":22,"total_tokens":30,"completion_tokens":8,"prompt_tokens_details":{"cached_tokens":0}}}'
)
FIRST_KEY = (
    'data: {"usage":{"prompt_tokens":22,"total_tokens":31,"completion_tokens":9},'
    '"choices":[{"index":0,"delta":{"content":"a"}}]}'
)
SPACED = (
    'data: {"choices": [{"index": 0, "delta": {"content": "b"}}], '
    '"usage": {"prompt_tokens": 22, "completion_tokens": 10}}'
)


@pytest.mark.parametrize("wish", [UsageWish(False, False), UsageWish(True, False), UsageWish(True, True)])
def test_usage_cut_in_place_equals_a_full_parse(wish: UsageWish) -> None:
    """After the first token the observer avoids parsing; what it sends and counts must not change."""
    stream = events([*CONTINUOUS[:3], NESTED, FIRST_KEY, SPACED, TOKEN.decode()[:-2], *CONTINUOUS[3:]])
    fast, parsed = [], []
    for out, use_parse in ((fast, False), (parsed, True)):
        rec, reported = record(), []
        observer = StreamObserver(rec, wish, reported.append)
        for event in stream:
            kept = observer._keep_parsed(event) if use_parse else observer.keep(event)
            if kept is not None:
                out.append(kept)
        out.append((reported, rec.prompt_tokens, rec.completion_tokens))
    assert fast == parsed
    assert fast[-1] == ([22, 1, 1, 6, 1, 1], 22, 2)
