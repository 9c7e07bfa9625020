"""The upstream SSE parser must give the same events however the byte stream is split."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenrelay.errors import UpstreamProtocolError
from tokenrelay.providers.sse_decoder import ServerSentEvent, SSEDecoder

# Text with 1- to 4-byte UTF-8 characters, and none of the characters that end a line.
texts = st.text(
    alphabet=st.sampled_from("ab :{}\"é€日😀𝄞"), min_size=0, max_size=12
)
line_endings = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[ServerSentEvent]]:
    """An event stream with comments, named events, ids and multi-line data, and the
    events a correct parser must find in it."""
    out: list[str] = []
    expected: list[ServerSentEvent] = []
    last_id: str | None = None
    for _ in range(draw(st.integers(0, 6))):
        eol = draw(line_endings)
        if draw(st.booleans()):
            out.append(":" + draw(texts) + eol)  # a comment, ignored
        name = draw(st.sampled_from([None, "done", "error"]))
        if name:
            out.append(f"event: {name}{eol}")
        if draw(st.booleans()):
            last_id = draw(st.from_regex(r"[0-9]{1,3}", fullmatch=True))
            out.append(f"id: {last_id}{eol}")
        lines = draw(st.lists(texts, min_size=1, max_size=3))
        for line in lines:
            # one space after the colon is dropped, any more are data
            spaced = draw(st.booleans()) or line.startswith(" ")
            out.append(f"data: {line}{eol}" if spaced else f"data:{line}{eol}")
        out.append(eol)
        expected.append(ServerSentEvent(data="\n".join(lines), event=name or "message", id=last_id))
    return "".join(out).encode(), expected


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def decode(pieces: list[bytes], *, data_only: bool = False) -> list[Any]:
    """The events of a stream fed in these pieces (with ``data_only``, their data alone)."""
    decoder = SSEDecoder()
    feed = decoder.feed_data if data_only else decoder.feed
    events = [event for piece in pieces for event in feed(piece)]
    assert not decoder.close()
    return events


@settings(max_examples=400)
@given(streams(), st.lists(st.integers(min_value=0), max_size=20))
def test_any_split_gives_the_same_events(stream: tuple[bytes, list[ServerSentEvent]], cuts: list[int]) -> None:
    data, expected = stream
    assert decode(split(data, cuts)) == expected


@given(streams())
def test_byte_by_byte(stream: tuple[bytes, list[ServerSentEvent]]) -> None:
    data, expected = stream
    assert decode([data[i : i + 1] for i in range(len(data))]) == expected


def test_openai_shaped_stream_split_inside_a_character() -> None:
    chunk = {"choices": [{"delta": {"content": "日本😀"}}]}
    data = b"data: " + orjson.dumps(chunk) + b"\r\n\r\ndata: [DONE]\r\n\r\n"
    cut = data.index("😀".encode()) + 2  # inside the 4-byte emoji
    events = decode([data[:cut], data[cut:]])
    assert [e.data for e in events] == [orjson.dumps(chunk).decode(), "[DONE]"]


def test_truncated_event_is_discarded_and_reported() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: complete\n\ndata: half") == [ServerSentEvent(data="complete")]
    assert decoder.close() is True


def test_byte_order_mark_is_skipped_even_when_split() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"\xef") == []
    assert decoder.feed(b"\xbb\xbfdata: x\n\n") == [ServerSentEvent(data="x")]


def test_bytes_that_are_not_utf8_are_a_protocol_error_not_replacement_characters() -> None:
    # Replaced by U+FFFD, a token would reach the client as an answer that looks whole.
    decoder = SSEDecoder()
    assert [e.data for e in decoder.feed(b'data: {"a":"caf\xc3\xa9"}\n\n')] == ['{"a":"café"}']
    with pytest.raises(UpstreamProtocolError, match="not UTF-8"):
        decoder.feed(b'data: {"a":"caf\xe9"}\n\n')
    assert [e.data for e in decoder.feed(b"data: next\n\n")] == ["next"]  # nothing of the bad event is kept


@settings(max_examples=400)
@given(streams(), st.lists(st.integers(min_value=0), max_size=20))
def test_data_alone_is_the_events_data_however_split(stream: tuple[bytes, list[ServerSentEvent]],
                                                     cuts: list[int]) -> None:
    data, expected = stream
    assert decode(split(data, cuts), data_only=True) == [e.data for e in expected]


@settings(max_examples=300)
@given(st.lists(texts, min_size=1, max_size=8), st.lists(st.integers(min_value=0), max_size=6),
       st.lists(st.booleans(), max_size=8))
def test_reads_of_whole_data_events_give_the_same_data(lines: list[str], cuts: list[int],
                                                       at_boundaries: list[bool]) -> None:
    """The shape of nearly every read from a model API — whole ``data: …`` events — split
    at event boundaries (the whole-read path) and anywhere else (the line-by-line path)."""
    events = [f"data: {line}\n\n".encode() for line in lines]
    stream = b"".join(events)
    ends = [sum(len(e) for e in events[:i + 1]) for i in range(len(events))]
    points = [ends[i] for i, keep in enumerate(at_boundaries[:len(ends)]) if keep] + list(cuts)
    pieces = split(stream, points)
    assert decode([b"data: first\n\n", *pieces], data_only=True) == ["first", *lines]


def test_whole_data_events_that_are_not_utf8_are_a_protocol_error() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_data(b"data: a\n\n") == ["a"]
    assert decoder.feed_data(b'data: {"a":"caf\xc3\xa9"}\n\ndata: b\n\n') == ['{"a":"café"}', "b"]
    with pytest.raises(UpstreamProtocolError, match="not UTF-8"):
        decoder.feed_data(b'data: {"a":"caf\xe9"}\n\n')
