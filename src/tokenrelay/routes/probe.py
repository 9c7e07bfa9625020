"""``GET /api/probe``: timed ticks for ``tokenrelay doctor``; no model call, no tokens spent.

    GET /api/probe?ticks=8&interval=0.25&idle=0

sends ``ticks`` lines, one every ``interval`` seconds, the first at once; with ``idle`` the
stream stays silent that long (no heartbeats) before the last tick, so a client can see
whether something in between cuts a silent stream. Each tick carries its sequence number,
the seconds since the probe began (server clock) and its send time (Unix seconds):

    text/plain (default)            tick seq=1 of=8 t=0.000 sent=1764103584.123456
    Accept: text/event-stream       event: tick / id: 1 / data: {"seq","of","t","sent"}

The headers are those of ``/api/get-response`` (``Cache-Control: no-cache, no-transform``,
``X-Accel-Buffering: no``), so a proxy treats the probe as it treats the real stream.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from .. import __version__
from ..errors import ValidationFailed
from ..logs import request_id
from ..schemas import describe_validation


class ProbeParams(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    ticks: int = Field(default=8, ge=1, le=100)
    interval: float = Field(default=0.25, ge=0, le=10, allow_inf_nan=False)
    idle: float = Field(default=0.0, ge=0, le=900, allow_inf_nan=False)

    def offset(self, seq: int) -> float:
        """When tick ``seq`` (from 1) is due, in seconds after the headers."""
        if self.idle and seq == self.ticks:
            return max(seq - 2, 0) * self.interval + self.idle
        return (seq - 1) * self.interval

    @property
    def duration(self) -> float:
        return self.offset(self.ticks)


def parse_params(query: dict[str, str]) -> ProbeParams:
    try:
        return ProbeParams.model_validate(query)
    except ValidationError as exc:
        raise ValidationFailed(describe_validation(exc)) from None


def text_tick(seq: int, of: int, t: float, sent: float) -> bytes:
    return b"tick seq=%d of=%d t=%.3f sent=%.6f\n" % (seq, of, t, sent)


def sse_tick(seq: int, of: int, t: float, sent: float) -> bytes:
    data = orjson.dumps({"seq": seq, "of": of, "t": round(t, 3), "sent": round(sent, 6)})
    return b"event: tick\nid: %d\ndata: %s\n\n" % (seq, data)


async def probe(request: Request) -> ProbeResponse:
    params = parse_params(dict(request.query_params))
    sse = "text/event-stream" in request.headers.get("accept", "")
    return ProbeResponse(params, sse=sse, request_id=request_id.get())


class ProbeResponse:
    """Plain ASGI, like the relay: a client that leaves ends the probe at once, even in the
    middle of a long ``idle`` silence."""

    def __init__(self, params: ProbeParams, *, sse: bool, request_id: str) -> None:
        self.params = params
        self.tick = sse_tick if sse else text_tick
        content_type = b"text/event-stream; charset=utf-8" if sse else b"text/plain; charset=utf-8"
        self.headers = [
            (b"content-type", content_type),
            (b"cache-control", b"no-cache, no-transform"),
            (b"x-accel-buffering", b"no"),
            (b"x-request-id", request_id.encode()),
            (b"x-tokenrelay-probe", __version__.encode()),
        ]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen_for_disconnect, receive, tg.cancel_scope)
            await self._ticks(send)
            tg.cancel_scope.cancel()

    async def _ticks(self, send: Any) -> None:
        p = self.params
        await send({"type": "http.response.start", "status": 200, "headers": self.headers})
        began = time.monotonic()
        for seq in range(1, p.ticks + 1):
            # Due times count from the start, so a late tick does not delay the rest.
            wait = began + p.offset(seq) - time.monotonic()
            if wait > 0:
                await anyio.sleep(wait)
            body = self.tick(seq, p.ticks, time.monotonic() - began, time.time())
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _listen_for_disconnect(receive: Any, scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()
