"""Per-event timing inside the gateway: where a stream's first token waited, read by read."""

from __future__ import annotations

import json
from pathlib import Path

from server.telemetry.stream_trace import StreamTiming, StreamTrace
from tests.support import Stack, open_raw_request, start_stack


def test_times_are_milliseconds_since_the_request_came() -> None:
    timing = StreamTiming(received_s=10.0, sent_s=10.001, headers_s=10.0205)
    timing.reads.append((10.03, 120, 2, 10.0301))
    assert timing.as_json(7, 200) == {
        "request_id": 7,
        "status": 200,
        "sent_ms": 1.0,
        "headers_ms": 20.5,
        "reads": [[30.0, 120, 2, 30.1]],
    }


def test_the_file_gets_one_line_per_stream(tmp_path: Path) -> None:
    trace = StreamTrace(tmp_path / "nested" / "trace.jsonl")
    trace.write(StreamTiming(received_s=1.0), 1, 200)
    trace.write(StreamTiming(received_s=2.0), 2, 499)
    trace.close()
    lines = [json.loads(line) for line in (tmp_path / "nested" / "trace.jsonl").read_text().splitlines()]
    assert [(line["request_id"], line["status"], line["reads"]) for line in lines] == [(1, 200, []), (2, 499, [])]


def test_a_traced_gateway_records_every_read_of_a_real_stream(stack: Stack, tmp_path: Path) -> None:
    trace_path = tmp_path / "trace.jsonl"
    gateway = start_stack(
        ["--upstream", stack.vllm_url], tmp_path / "gateway.log", env={"STUDENT_STREAM_TRACE_PATH": str(trace_path)}
    )
    try:
        gateway.wait_ready(60)
        body = {"model": "student", "prompt": "Xin chào", "max_tokens": 16, "ignore_eos": True, "stream": True}
        sock = open_raw_request(gateway.port, "/v1/completions", body)
        received = b""
        while b"data: [DONE]" not in received:
            chunk = sock.recv(65536)
            assert chunk, received[-300:]
            received += chunk
        sock.close()
        assert gateway.stop() == 0
    finally:
        gateway.kill_all()
    (line,) = [json.loads(text) for text in trace_path.read_text().splitlines()]
    assert line["status"] == 200
    assert 0 <= line["sent_ms"] <= line["headers_ms"]
    reads = line["reads"]
    assert sum(events for _, _, events, _ in reads) == received.count(b"data: ")  # every event, once
    times = [moment for read_ms, _, _, written_ms in reads for moment in (read_ms, written_ms)]
    assert times == sorted(times) and times[0] >= line["headers_ms"]
