from __future__ import annotations

import json

import pytest

from server.telemetry import RequestRecord, StreamObserver, describe, request_usage_in_stream, take_usage_from_body

ROLE = b'data: {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}\n\n'
TOKEN = b'data: {"choices": [{"index": 0, "delta": {"content": "xin"}}]}\n\n'
TEXT = b'data: {"choices": [{"index": 0, "text": " ch\\u00e0o"}]}\n\n'
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}\n\n'
DONE = b"data: [DONE]\n\n"


def record(**kwargs: object) -> RequestRecord:
    return RequestRecord("/v1/chat/completions", "http://up", True, **kwargs)  # type: ignore[arg-type]


def test_streams_ask_upstream_for_usage_keeping_other_options() -> None:
    body, wants = request_usage_in_stream({"stream": True, "stream_options": {"continuous_usage_stats": False}})
    assert wants is False
    assert json.loads(body)["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}


def test_a_client_that_asked_for_usage_is_sent_unchanged() -> None:
    assert request_usage_in_stream({"stream": True, "stream_options": {"include_usage": True}}) == (None, True)


@pytest.mark.parametrize("wants_usage", [False, True])
def test_observer_records_first_content_and_usage_and_drops_unasked_usage(wants_usage: bool) -> None:
    rec = record(started_s=100.0)
    observer = StreamObserver(rec, client_wants_usage=wants_usage)
    kept = [event for event in (ROLE, TOKEN, TEXT, USAGE, DONE) if observer.keep(event)]
    assert (rec.prompt_tokens, rec.completion_tokens) == (12, 5)
    assert rec.first_token_s is not None and rec.first_token_s > rec.started_s
    expected = [ROLE, TOKEN, TEXT, USAGE, DONE] if wants_usage else [ROLE, TOKEN, TEXT, DONE]
    assert kept == expected


def test_an_empty_role_chunk_is_not_the_first_token() -> None:
    rec = record()
    StreamObserver(rec, client_wants_usage=False).keep(ROLE)
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
