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

import asyncio
import time
from collections.abc import AsyncGenerator, Callable

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request

from .. import __version__
from ..errors import ValidationFailed
from ..logs import request_id
from ..schemas import describe_validation
from ..state import app_state
from ..streaming.response import StreamResponse, body_of
from .endpoint import Endpoint


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


@Endpoint
async def probe(request: Request) -> StreamResponse:
    params = parse_params(dict(request.query_params))
    sse = "text/event-stream" in request.headers.get("accept", "")
    content_type = b"text/event-stream; charset=utf-8" if sse else b"text/plain; charset=utf-8"
    headers = [
        (b"content-type", content_type),
        (b"cache-control", b"no-cache, no-transform"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", request_id.get().encode()),
        (b"x-tokenrelay-probe", __version__.encode()),
    ]
    # No heartbeat: a probe's silence is what it measures. A client that leaves ends it at
    # once, even in the middle of a long ``idle``.
    return StreamResponse(body_of(ticks(params, sse_tick if sse else text_tick)), headers=headers,
                          send_timeout=app_state(request).settings.send_timeout)


async def ticks(params: ProbeParams, tick: Callable[[int, int, float, float], bytes]) -> AsyncGenerator[bytes, None]:
    began = time.monotonic()
    for seq in range(1, params.ticks + 1):
        # Due times count from the start, so a late tick does not delay the rest.
        wait = began + params.offset(seq) - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        yield tick(seq, params.ticks, time.monotonic() - began, time.time())
