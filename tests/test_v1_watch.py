"""``StreamWatch`` sees what tokenrelay needs in a passthrough stream however its bytes are
split into reads: inside a line, a pattern, a multi-byte character, between two newlines."""

from __future__ import annotations

import orjson
import pytest

from tokenrelay.streaming.sse_watch import StreamWatch


def chunk(delta: dict, finish: str | None = None, usage: dict | None = None, spaced: bool = False) -> bytes:
    data = {"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else [], "usage": usage}
    if spaced:  # some servers write JSON with spaces after ':' and ','
        return b"data: " + orjson.dumps(data).replace(b'":', b'": ').replace(b",", b", ") + b"\n\n"
    return b"data: " + orjson.dumps(data) + b"\n\n"


USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
STREAM = (chunk({"role": "assistant", "content": ""}) + chunk({"content": "dé"}) + b": keep-alive\n\n"
          + chunk({"content": "jà 😀 \"usage\":{ [DONE]"}) + chunk({}, "stop") + chunk({}, usage=USAGE)
          + b"data: [DONE]\n\n")


def watch(*parts: bytes) -> StreamWatch:
    w = StreamWatch()
    for part in parts:
        w.feed(part)
    return w


@pytest.mark.parametrize("spaced", [False, True])
def test_every_split_in_two(spaced: bool) -> None:
    stream = STREAM if not spaced else STREAM.replace(chunk({}, "stop"), chunk({}, "stop", spaced=True)).replace(
        chunk({}, usage=USAGE), chunk({}, usage=USAGE, spaced=True))
    for i in range(len(stream) + 1):
        w = watch(stream[:i], stream[i:])
        assert (w.done, w.finish_reason, w.usage, w.error, w.pending) == (True, "stop", USAGE, None, False), i
        assert w.events == 7, i


def test_every_split_in_three_around_the_end() -> None:
    for i in range(len(STREAM) - 120, len(STREAM)):
        for j in range(i, len(STREAM) + 1):
            w = watch(STREAM[:i], STREAM[i:j], STREAM[j:])
            assert (w.done, w.finish_reason, w.usage, w.events) == (True, "stop", USAGE, 7), (i, j)


def test_byte_by_byte() -> None:
    w = watch(*(STREAM[i:i + 1] for i in range(len(STREAM))))
    assert (w.done, w.finish_reason, w.usage, w.events) == (True, "stop", USAGE, 7)


def test_text_that_looks_like_a_pattern_is_not_taken_for_one() -> None:
    w = watch(chunk({"content": 'data: [DONE] "error": {"usage":{}}'}))
    assert (w.done, w.error, w.usage) == (False, None, None)


def test_error_event_and_a_cut_stream() -> None:
    error = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n'
    w = watch(chunk({"content": "a"}), error)
    assert w.error == {"message": "overloaded", "type": "server_error"}
    assert not w.done
    cut = watch(chunk({"content": "a"}), chunk({"content": "b"})[:20])
    assert cut.pending and not cut.done


def test_of_two_events_in_one_read_that_set_the_same_field_the_later_wins() -> None:
    """Lines holding a pattern are parsed in stream order, whichever pattern found them."""
    first = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + b"\n\n"
    later = b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
                                      "usage": USAGE}) + b"\n\n"
    w = watch(chunk({"content": "x"}) + first + later + b"data: [DONE]\n\n")
    assert (w.done, w.finish_reason, w.usage, w.events) == (True, "length", USAGE, 4)
