"""The OpenAI-compatible provider decodes a streamed chat completion into the same deltas
however the upstream's bytes are split — inside lines, between CR and LF, inside UTF-8
characters. ``chat_deltas`` is fed the pieces directly (a socket would merge them at will);
the provider runs against the real simulator over real sockets in the route tests, and the
upstream client against scripted servers in test_upstream_client.py."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenrelay.errors import UpstreamError, UpstreamProtocolError
from tokenrelay.providers.base import Delta, Usage
from tokenrelay.providers.openai_compat import chat_deltas
pieces = st.text(alphabet=st.sampled_from("ab \n\"\\é€日😀𝄞"), min_size=1, max_size=6)


def chunk(content: str | None = None, *, finish: str | None = None, usage: dict | None = None) -> dict:
    choices = [] if usage else [{"index": 0, "delta": {"content": content} if content else {},
                                 "finish_reason": finish}]
    body: dict = {"id": "c", "object": "chat.completion.chunk", "choices": choices}
    if usage:
        body["usage"] = usage
    return body


def frame(event: dict, eol: str, multiline: bool) -> str:
    data = orjson.dumps(event).decode()
    if multiline:  # JSON split over several data: lines is joined with '\n' — still valid JSON
        cut = data.index(",")
        return f"data: {data[:cut]}{eol}data: {data[cut:]}{eol}{eol}"
    return f"data: {data}{eol}{eol}"


def run(parts: list[bytes]) -> list[Delta]:
    async def pieces() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async def go() -> list[Delta]:
        return [d async for d in chat_deltas(pieces())]

    return asyncio.run(go())


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    return [*out, data[last:]]


@given(
    texts=st.lists(pieces, min_size=1, max_size=8),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    multiline=st.booleans(),
    comments=st.booleans(),
    cuts=st.lists(st.integers(min_value=0), max_size=25),
)
def test_every_split_gives_the_same_deltas(texts, eol, multiline, comments, cuts) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": len(texts), "total_tokens": 3 + len(texts)}
    stream = "".join(
        (f": keep-alive{eol}" if comments else "") + frame(chunk(t), eol, multiline) for t in texts
    ) + frame(chunk(finish="stop"), eol, False) + frame(chunk(usage=usage), eol, multiline) + f"data: [DONE]{eol}{eol}"
    deltas = run(split(stream.encode(), cuts))
    assert "".join(d.text for d in deltas) == "".join(texts)
    # Tokens read together arrive as one piece, but a token is never cut in two.
    ends = set(itertools.accumulate(len(t) for t in texts))
    assert set(itertools.accumulate(len(d.text) for d in deltas if d.text)) <= ends
    assert deltas[-2].finish_reason == "stop"
    assert deltas[-1].usage == Usage(3, len(texts), 3 + len(texts))


def test_tokens_read_together_are_one_piece_and_tokens_read_apart_are_not() -> None:
    events = [frame(chunk(t), "\n", False).encode() for t in ("a", "b", "c")]
    end = (frame(chunk(finish="stop"), "\n", False) + "data: [DONE]\n\n").encode()
    assert [d.text for d in run([b"".join(events) + end])] == ["abc", ""]
    assert [d.text for d in run([*events, end])] == ["a", "b", "c", ""]


@given(cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_error_object_mid_stream_raises(cuts) -> None:
    stream = frame(chunk("partial"), "\n", False) + frame({"error": {"message": "overloaded"}}, "\n", False)
    with pytest.raises(UpstreamError, match="overloaded"):
        run(split(stream.encode(), cuts))


def test_stream_cut_before_the_end_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError, match="before the answer finished"):
        run([frame(chunk("partial"), "\n", False).encode()])


def test_not_json_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError, match="not JSON"):
        run([b"data: {oops\n\n"])
