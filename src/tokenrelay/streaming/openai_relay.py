"""The ``/v1/chat/completions`` answer: an OpenAI-compatible answer from any upstream.

Two paths, picked by what the provider returned (``providers.base``):

* **passthrough** (a ``Passthrough``, from an OpenAI-compatible upstream): the upstream's
  bytes go to the client as they arrive, unchanged — every field the upstream sends (tool
  calls, logprobs, refusals, usage) reaches the SDK. ``StreamWatch`` looks at them in passing
  for the log line and to notice a stream that broke off.
* **encode** (deltas, from the simulator or an Anthropic upstream): the deltas are written as
  ``chat.completion.chunk`` events (``openai_chunks``).

``v1_body`` picks the body for ``StreamResponse``, which answers a failure before the first byte
with OpenAI's error body (``openai_error``), after retries where they are safe (``routing``);
after it, the body ends with a ``data: {"error": …}`` event that the SDKs raise.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import orjson

from ..errors import (
    TokenrelayError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    error_headers,
    openai_body,
    openai_dict,
)
from ..providers.base import Delta, Passthrough, UpstreamBody, Usage
from ..resume.log import Ending
from .live import Resume
from .openai_chunks import ChunkEncoder
from .record import StreamRecord
from .relay import close_deltas, collect
from .response import Body, Headers
from .sse_watch import StreamWatch
from .wire import openai_event

STREAM_HEADERS: Headers = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


def openai_error(exc: TokenrelayError) -> tuple[int, Headers, bytes]:
    """An error before the first byte, in OpenAI's shape (for ``StreamResponse``)."""
    return exc.status, error_headers(exc), openai_body(exc)


def v1_body(opened: Passthrough | AsyncIterator[Delta], record: StreamRecord, headers: Headers, *,
            resume: V1Resume | None, include_usage: bool) -> Body:
    """The answer, in whichever of the four shapes the request and the provider make: a
    streamed one (``resume`` given) is written to its stream's log as it goes. Each body adds
    its content type to ``headers`` before its first piece."""
    if isinstance(opened, Passthrough):
        response = opened.response
        return pass_stream(response, record, headers, resume) if resume else pass_whole(response, record, headers)
    if resume:
        return encode_stream(opened, record, headers, resume, include_usage=include_usage)
    return encode_whole(opened, record, headers)


class V1Resume(Resume):
    """A ``/v1`` stream's part in its ``StreamResponse`` (``response.Resumable``): its log is
    written by the bodies below, on the ``openai`` wire."""

    __slots__ = ()

    def closing_on_stop(self) -> bytes | None:
        # The body may not have logged its ending yet (the stop landed while a chunk was being
        # sent); the stop's own ending is the same bytes.
        stream = self.stream
        ending = stream.log.ending or Ending("stopped", {"reason": stream.stop_reason or "stopped", "usage": None})
        return self.wire.ending(ending)

    def stopped(self, record: StreamRecord) -> Ending:
        """The ending of a body that was cancelled: stopped, given up, its client gone."""
        return Ending("stopped", {"reason": self.stream.stop_reason or "client_cancelled",
                                  "usage": record.usage.to_dict() if record.usage else None})


def failed(exc: TokenrelayError) -> Ending:
    """A failure's ending, as the client was told it: OpenAI's error shape."""
    return Ending("error", openai_dict(exc))


# --- passthrough ---

MAX_WHOLE_BODY = 64 << 20
"""Bytes of a non-streamed answer held before it is refused: an answer is a few kilobytes;
this bounds what a broken upstream can make tokenrelay hold."""


async def pass_stream(response: UpstreamBody, record: StreamRecord, headers: Headers,
                      resume: V1Resume) -> AsyncGenerator[bytes, None]:
    headers.insert(0, (b"content-type", response.headers.get("content-type", "text/event-stream").encode()))
    stream = resume.stream
    watch = StreamWatch()
    log = stream.log
    events = EventNumbers(log.append)
    # The client gets the events plain whatever the upstream did (it was asked for identity),
    # and each piece is checked as UTF-8: the SDKs fail on anything else with their own error
    # instead of an upstream error they can report.
    utf8 = codecs.getincrementaldecoder("utf-8")()
    failure: TokenrelayError | None = None
    sent = False
    ending: Ending | None = None
    closing = b""
    try:
        try:
            _check_encoding(response)
            async for chunk in response:
                try:
                    utf8.decode(chunk)
                except UnicodeDecodeError as exc:
                    raise UpstreamProtocolError(f"upstream sent bytes that are not UTF-8 in its event stream: {exc}") from None
                watch.feed(chunk)
                out = events.feed(chunk)
                if not out:
                    continue  # an event is not whole yet: it goes out, numbered, when it is
                if log.backlog is not None and (behind := log.backlog()) is not None:
                    await behind  # the shared store (Redis) is far behind: let it catch up
                if record.first_token is None:
                    record.first_token = time.perf_counter()
                record.bytes_out += len(out)
                sent = True
                yield out
        except UpstreamProtocolError as exc:
            if not sent:
                ending = failed(exc)
                raise  # nothing reached the client yet: an honest 502
            failure = exc
        except TokenrelayError as exc:  # went silent, hung up, or outgrew the stream's log
            failure = exc
        if failure is None and watch.done and events.pending:
            closing = events.rest()  # "data: [DONE]" without its blank line, as the upstream ended
        record.chunks = watch.events
        if watch.usage:
            record.usage = _usage(watch.usage)
        record.finish_reason = watch.finish_reason
        if watch.error is not None:
            record.outcome = "failed_midway"
            record.error_type = str(watch.error.get("code") or watch.error.get("type") or "upstream_error")
            ending = Ending("error", {"error": watch.error})  # relayed as the upstream sent it
        elif not watch.done:
            failure = failure or UpstreamProtocolError("upstream closed the stream before data: [DONE]")
        if failure is not None:
            record.fail(failure, midway=True)
            # An event the upstream left half-written is not sent: the error is the next event.
            ending = failed(failure)
            closing = resume.wire.ending(ending) or b""
        elif ending is None:
            ending = Ending("done", {"finish_reason": record.finish_reason,
                                     "usage": record.usage.to_dict() if record.usage else None})
    finally:
        response.close()
        resume.streams.finished(stream, ending or resume.stopped(record))
    if closing:
        yield closing


MAX_EVENT = 4 << 20
"""Bytes of one upstream event held until its end: an event is a chunk of an answer; this
bounds what a broken upstream can make tokenrelay hold."""


class EventNumbers:
    """Numbers the upstream's events on their way to the client: each event with data gets
    an ``id: N`` line before it and its data is logged as piece N; all other bytes pass
    unchanged. ``data: [DONE]`` and an error event are the stream's ending, not pieces, so
    they carry no id (a resume after the last chunk gets the ending, once).

    Only whole events go out, since the id must come before an event that is not yet known to
    be a chunk. Upstreams send whole events per read almost always, and an SSE client acts on
    an event only at its blank line anyway; one cut in the middle is never sent, so the
    client meets the error event next rather than a broken one."""

    __slots__ = ("_append", "_partial", "_sep", "_nl", "_event")

    def __init__(self, append: Callable[[str], int]) -> None:
        self._append = append
        self._partial = b""
        self._sep = b""  # found in the first line: "\n\n", or "\r\n\r\n" from some servers
        self._nl = b"\n"
        self._event = b"id: %d\n%b\n\n"  # an event of one line, numbered

    @property
    def pending(self) -> bool:
        return bool(self._partial)

    def rest(self) -> bytes:
        rest, self._partial = self._partial, b""
        return rest

    def feed(self, chunk: bytes) -> bytes:
        buf = self._partial + chunk if self._partial else chunk
        sep = self._sep
        if not sep:
            line = buf.find(b"\n")
            if line == -1:
                return self._hold(buf)
            sep = self._sep = b"\r\n\r\n" if buf[line - 1:line] == b"\r" else b"\n\n"
            self._nl = nl = sep[:len(sep) // 2]
            self._event = b"id: %d" + nl + b"%b" + sep
        end = buf.rfind(sep)
        if end == -1:
            return self._hold(buf)
        end += len(sep)
        if end == len(buf):
            self._partial = b""
        else:
            self._partial, buf = buf[end:], buf[:end]
        nl = self._nl
        append = self._append
        # A chunk's data is a JSON object: "data: {" leaves out comments and [DONE] at once. An
        # error event is looked for once per read, and is rare.
        plain = b'"error"' not in buf
        if plain and buf.startswith(b"data: {") and buf.find(nl) + len(sep) == end:
            # Nearly always: one event of one data line per read, found out in one scan.
            return b"id: %d%b%b" % (append(buf[6:end - len(sep)].decode()), nl, buf)
        blocks = buf.split(sep)
        blocks.pop()  # what follows the last blank line: nothing
        parts: list[bytes] = []
        if plain and buf.count(nl) == 2 * len(blocks):  # events of one line each
            if buf.startswith(b"data: {") and buf.count(sep + b"data: {") == len(blocks) - 1:
                # Each a chunk: a relay that fell behind reads many at a time, so no test per event.
                event = self._event
                return b"".join([event % (append(block[6:].decode()), block) for block in blocks])
            for block in blocks:
                if block.startswith(b"data: {"):
                    parts.append(self._event % (append(block[6:].decode()), block))
                    continue
                data = self._data(block)
                if data is not None:
                    parts.append(b"id: %d%b" % (append(data.decode()), nl))
                parts.append(block + sep)
            return b"".join(parts)
        for block in blocks:
            data = self._data(block)
            if data is not None:
                parts.append(b"id: %d%b" % (append(data.decode()), nl))
            parts.append(block + sep)
        return b"".join(parts)

    def _hold(self, buf: bytes) -> bytes:
        if len(buf) > MAX_EVENT:
            raise UpstreamProtocolError(f"upstream sent an event longer than {MAX_EVENT >> 20} MiB")
        self._partial = buf
        return b""

    def _data(self, block: bytes) -> bytes | None:
        """The data of an event that is a chunk; None for anything else (a comment, the
        ending)."""
        nl = self._nl
        if block.startswith(b"data: ") and nl not in block:
            data = block[6:]
        else:
            lines = [line[5:] for line in block.split(nl) if line.startswith(b"data:")]
            if not lines:
                return None
            data = b"\n".join(line[1:] if line[:1] == b" " else line for line in lines)
        if data == b"[DONE]" or (b'"error"' in data and _is_error(data)):
            return None
        return data


def _is_error(data: bytes) -> bool:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and bool(event.get("error"))


async def pass_whole(response: UpstreamBody, record: StreamRecord, headers: Headers) -> AsyncGenerator[bytes, None]:
    """The upstream's JSON answer, checked to be one: anything else (an HTML error page
    behind a 200, bytes that are not UTF-8) is a 502 in OpenAI's shape, which the SDKs raise,
    rather than a 200 they would hand to the caller as a string."""
    try:
        _check_encoding(response)
        parts: list[bytes] = []
        size = 0
        async for piece in response:
            size += len(piece)
            if size > MAX_WHOLE_BODY:
                raise UpstreamProtocolError(f"upstream answer is larger than {MAX_WHOLE_BODY >> 20} MiB")
            parts.append(piece)
    except UpstreamTimeout:
        raise UpstreamTimeout("upstream did not finish its answer in time") from None
    finally:
        response.close()
    body = b"".join(parts)
    record.first_token = time.perf_counter()
    record.bytes_out = len(body)
    try:
        answer = orjson.loads(body)  # also refuses bytes that are not UTF-8
    except orjson.JSONDecodeError:
        kind = response.headers.get("content-type", "no content type")
        raise UpstreamProtocolError(
            f"upstream answered 200 with a body that is not JSON ({kind}): {body[:80].decode('utf-8', 'replace')!r}"
        ) from None
    if not isinstance(answer, dict):
        raise UpstreamProtocolError("upstream answered 200 with JSON that is not an object")
    record.usage = _usage(answer.get("usage"))
    try:
        record.finish_reason = answer["choices"][0].get("finish_reason")
    except (AttributeError, LookupError, TypeError):
        pass
    headers.insert(0, (b"content-type", b"application/json"))
    yield body


def _check_encoding(response: UpstreamBody) -> None:
    """The transport decodes gzip and deflate; a body still encoded cannot be checked, and
    most clients could not read it either."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise UpstreamProtocolError(f"upstream answered in Content-Encoding {encoding!r}, which tokenrelay does not decode")


# --- encode ---

async def encode_stream(deltas: AsyncIterator[Delta], record: StreamRecord, headers: Headers, resume: V1Resume, *,
                        include_usage: bool) -> AsyncGenerator[bytes, None]:
    """The deltas as chunks, each numbered and logged as it goes (``wire.OpenAIWire``)."""
    enc = ChunkEncoder(id=completion_id(record), model=record.model)
    headers.insert(0, (b"content-type", b"text/event-stream"))
    stream = resume.stream
    log = stream.log
    append = log.append
    ending: Ending | None = None
    try:
        try:
            role = enc.role_json()
            yield openai_event(append(role.decode()), role)
            async for delta in deltas:
                if delta.tool_calls or delta.finish_reason is not None or delta.usage is not None:
                    body = b"".join(openai_event(append(chunk.decode()), chunk)
                                    for chunk in enc.jsons(delta, include_usage=include_usage))
                    record.note(delta)
                elif delta.text:  # the hot path: one chunk of text
                    chunk = enc.text_json(delta.text)
                    body = openai_event(append(chunk.decode()), chunk)
                else:
                    continue
                if log.backlog is not None and (behind := log.backlog()) is not None:
                    await behind  # the shared store (Redis) is far behind: let it catch up
                if body:
                    if record.first_token is None:
                        record.first_token = time.perf_counter()
                    record.chunks += 1
                    record.bytes_out += len(body)
                    yield body
            ending = Ending("done", {"finish_reason": record.finish_reason,
                                     "usage": record.usage.to_dict() if record.usage else None})
        except TokenrelayError as exc:  # the upstream failed, or the answer outgrew its log
            record.fail(exc, midway=True)
            ending = failed(exc)
        finally:
            await close_deltas(deltas)
    finally:
        resume.streams.finished(stream, ending or resume.stopped(record))
    assert ending is not None  # a cancelled body does not get here
    yield resume.wire.ending(ending) or b""


async def encode_whole(deltas: AsyncIterator[Delta], record: StreamRecord, headers: Headers) -> AsyncGenerator[bytes, None]:
    completion = await collect(deltas)
    record.first_token = time.perf_counter()
    record.usage, record.finish_reason = completion.usage, completion.finish_reason
    body = completion.body(id=completion_id(record), model=record.model)
    record.bytes_out = len(body)
    headers.insert(0, (b"content-type", b"application/json"))
    yield body


def completion_id(record: StreamRecord) -> str:
    return "chatcmpl-" + record.stream_id.removeprefix("st_")


def _usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    try:
        prompt = int(raw.get("prompt_tokens") or 0)
        completion = int(raw.get("completion_tokens") or 0)
        return Usage(prompt, completion, int(raw.get("total_tokens") or prompt + completion))
    except (TypeError, ValueError):  # the answer goes on as sent; only the log line lacks its usage
        return None
