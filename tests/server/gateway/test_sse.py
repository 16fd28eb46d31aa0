from __future__ import annotations

import pytest

from server.gateway.sse import EventSplitter

STREAM = b'data: {"a": 1}\n\ndata: {"b": "x\\ny"}\n\ndata: [DONE]\n\n'


def split_all(chunks: list[bytes]) -> list[bytes]:
    splitter = EventSplitter()
    events = [event for chunk in chunks for event in splitter.feed(chunk)]
    assert splitter.flush() == b""
    return events


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(STREAM)])
def test_events_come_out_whole_whatever_the_chunking(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert split_all(chunks) == [b'data: {"a": 1}\n\n', b'data: {"b": "x\\ny"}\n\n', b"data: [DONE]\n\n"]


def test_event_is_released_as_soon_as_its_separator_arrives() -> None:
    splitter = EventSplitter()
    assert list(splitter.feed(b"data: 1\n")) == []
    assert list(splitter.feed(b"\ndata: 2")) == [b"data: 1\n\n"]
    assert splitter.flush() == b"data: 2"


def test_crlf_separators_are_understood() -> None:
    assert split_all([b"data: 1\r\n\r\ndata: 2\r\n\r\n"]) == [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"]


def test_earliest_separator_wins_when_styles_mix() -> None:
    assert split_all([b"data: 1\n\ndata: 2\r\n\r\n"]) == [b"data: 1\n\n", b"data: 2\r\n\r\n"]


def test_a_read_of_exactly_one_event_comes_out_as_it_is() -> None:
    splitter = EventSplitter()
    event = b'data: {"a": 1}\n\n'
    assert splitter.feed(event) == [event]
    assert splitter.feed(b"\n\n") == [b"\n\n"]
    assert splitter.feed(b"data: 1\r\n\r\n") == [b"data: 1\r\n\r\n"]
    assert splitter.flush() == b""
