"""The client side of ``tokenrelay ask``: stream an answer from a tokenrelay service."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from .providers.sse_decoder import SSEDecoder


class AskFailed(Exception):
    """The service refused the question, or the stream broke before the answer ended."""


@dataclass
class AskStats:
    started: float
    first_token: float | None = None
    ended: float | None = None
    tokens: int = 0

    def describe(self) -> str:
        if self.first_token is None or self.ended is None:
            return "no tokens received"
        ttft = (self.first_token - self.started) * 1000
        span = self.ended - self.first_token
        rate = f"{self.tokens / span:.1f} tokens/s" if span > 0 else "all at once"
        return f"time to first token {ttft:.0f} ms, {self.tokens} tokens, {rate}"


def stream_answer(url: str, body: dict[str, Any], *, sse: bool, write: Callable[[str], Any],
                  flush: Callable[[], Any], timeout: float = 600.0, key: str | None = None) -> AskStats:
    headers = {"accept": "text/event-stream" if sse else "text/plain"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    stats = AskStats(started=time.perf_counter())
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0)) as client:
            with client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    raise AskFailed(_refusal(response))
                if sse:
                    _read_sse(response, stats, write, flush)
                else:
                    _read_text(response, stats, write, flush)
    except httpx.ConnectError as exc:
        raise AskFailed(f"cannot reach {url}: {exc}") from None
    except httpx.TimeoutException:
        raise AskFailed(f"no answer from {url} within {timeout:.0f} s") from None
    except httpx.HTTPError as exc:
        raise AskFailed(f"the stream failed midway: {exc}") from None
    stats.ended = time.perf_counter()
    return stats


def _refusal(response: httpx.Response) -> str:
    response.read()
    try:
        error = orjson.loads(response.content)["error"]
        return f"{response.status_code} {error['type']}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}"


def _read_text(response: httpx.Response, stats: AskStats, write: Callable[[str], Any],
               flush: Callable[[], Any]) -> None:
    # A proxy may re-chunk the body anywhere, even inside a character.
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    for chunk in response.iter_raw():
        text = decoder.decode(chunk)
        if text:
            if stats.first_token is None:
                stats.first_token = time.perf_counter()
            stats.tokens += 1
            write(text)
            flush()
    write(decoder.decode(b"", final=True))


def _read_sse(response: httpx.Response, stats: AskStats, write: Callable[[str], Any],
              flush: Callable[[], Any]) -> None:
    decoder = SSEDecoder()
    for chunk in response.iter_raw():
        for event in decoder.feed(chunk):
            data = orjson.loads(event.data)
            if event.event == "message":
                if stats.first_token is None:
                    stats.first_token = time.perf_counter()
                stats.tokens += 1
                write(data["text"])
                flush()
            elif event.event == "done":
                usage = data.get("usage")
                if usage:
                    stats.tokens = usage["completion_tokens"]
                return
            elif event.event == "error":
                error = data["error"]
                raise AskFailed(f"the stream failed midway: {error['type']}: {error['message']}")
    raise AskFailed("the stream ended before the answer finished")
