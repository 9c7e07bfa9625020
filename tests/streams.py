"""Client-side helpers for the tests: read a stream and note when each piece arrived."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from tokenrelay.providers.sse_decoder import ServerSentEvent, SSEDecoder


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Arrivals:
    status: int
    headers: httpx.Headers
    chunks: list[bytes] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    error: Exception | None = None
    started: float = 0.0  # when the request was sent (perf_counter)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def decoded(self) -> bytes:
        """The body with its gzip or deflate Content-Encoding (if any) undone."""
        encoding = self.headers.get("content-encoding", "identity")
        if encoding == "identity":
            return self.body
        if encoding in ("gzip", "deflate"):
            return zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(self.body)  # 32: gzip or zlib header
        raise AssertionError(f"unexpected content-encoding {encoding!r}")

    @property
    def ttfb(self) -> float:
        """Seconds from sending the request to the first piece of the body."""
        return self.times[0] - self.started if self.times else float("inf")

    @property
    def gaps(self) -> list[float]:
        """Seconds between each piece and the next."""
        return [b - a for a, b in zip(self.times, self.times[1:])]

    @property
    def spread(self) -> float:
        """Seconds between the first and the last piece."""
        return self.times[-1] - self.times[0] if self.times else 0.0

    def events(self) -> list[ServerSentEvent]:
        decoder = SSEDecoder()
        return decoder.feed(self.decoded)


def read_stream(url: str, body: dict[str, Any], *, sse: bool = False, timeout: float = 30,
                headers: dict[str, str] | None = None) -> Arrivals:
    """POST ``body`` and note when each raw piece arrives (still compressed, if it was)."""
    headers = {**({"accept": "text/event-stream"} if sse else {}), **(headers or {})}
    with httpx.Client(timeout=timeout) as client:
        started = time.perf_counter()
        with client.stream("POST", url + "/api/get-response", json=body, headers=headers) as response:
            result = Arrivals(status=response.status_code, headers=response.headers, started=started)
            try:
                for chunk in response.iter_raw():
                    result.chunks.append(chunk)
                    result.times.append(time.perf_counter())
            except httpx.HTTPError as exc:
                result.error = exc
    return result


def event_data(event: ServerSentEvent) -> Any:
    return orjson.loads(event.data)
