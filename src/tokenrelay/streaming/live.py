"""A resumable answer (``/api/get-response`` as text or SSE): each delta is written to the
stream's log and sent to the connection that asked, encoded once by the stream's ``wire`` —
the same encoding a reader that comes back gets (``routes.streams``).

However the answer ends, the log gets its ending: ``done``, ``error`` (a failure, in-band for
SSE, the body broken off for text), or ``stopped`` — stopped on request, given up after its
grace with nobody reading, or its client gone with no grace — so a later reader learns how
it ended, never a silence.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..errors import TokenrelayError
from ..providers.base import Delta
from ..resume.log import Ending
from ..resume.registry import LiveStream, Streams
from .record import StreamRecord
from .relay import close_deltas
from .response import Body
from .wire import Wire


class Resume:
    """One resumable answer's part in its ``StreamResponse``: the body, and what to do when
    its client leaves or it is stopped (``response.Resumable``). One small object per open
    stream rather than a closure for each."""

    __slots__ = ("stream", "streams", "wire")

    def __init__(self, stream: LiveStream, wire: Wire, streams: Streams) -> None:
        self.stream, self.wire, self.streams = stream, wire, streams

    def client_left(self) -> None:
        self.streams.detach(self.stream)

    def closing_on_stop(self) -> bytes | None:
        ending = self.stream.log.ending
        return self.wire.ending(ending) if ending is not None else None

    async def body(self, deltas: AsyncIterator[Delta], record: StreamRecord) -> Body:
        stream, wire = self.stream, self.wire
        log = stream.log
        ending: Ending | None = None
        failure: TokenrelayError | None = None
        try:
            opening = wire.opening(stream.id, record.model)
            if opening:
                yield opening
            async for delta in deltas:
                text = delta.text
                if text:
                    seq = log.append(text)
                    if log.backlog is not None and (behind := log.backlog()) is not None:
                        await behind
                    body = wire.piece(seq, text)
                    if seq == 1:
                        record.first_token = time.perf_counter()
                    record.chunks += 1
                    record.bytes_out += len(body)
                    yield body
                if delta.finish_reason is not None or delta.usage is not None:
                    record.note(delta)
            ending = Ending("done", {"finish_reason": record.finish_reason, "usage": _usage(record)})
        except TokenrelayError as exc:  # the upstream failed, or the answer outgrew its log
            failure = exc
            ending = Ending("error", exc.to_dict())
        finally:
            await close_deltas(deltas)
            if ending is None:  # cancelled: stopped, given up, its client gone, or shutdown
                ending = Ending("stopped", {"reason": stream.stop_reason or "client_cancelled",
                                            "usage": _usage(record)})
            self.streams.finished(stream, ending)
        closing = wire.ending(ending)
        if closing is None:
            assert failure is not None  # a wire says every ending but a failure's in-band or not at all
            raise failure
        if failure is not None:
            record.fail(failure, midway=True)
        if closing:
            yield closing


def _usage(record: StreamRecord) -> dict[str, int] | None:
    return record.usage.to_dict() if record.usage else None
