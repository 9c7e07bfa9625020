"""The client side of ``tokenrelay ask``: stream an answer from a tokenrelay service."""

from __future__ import annotations

import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from .providers.sse_decoder import ServerSentEvent, SSEDecoder
from .upstreams import UpstreamView

ANSWER_PATH = "/api/get-response"
KEY_ENV = "TOKENRELAY_API_KEY"
LOOKUP_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 180.0
"""Longest silence on an answer's connection before it counts as lost. SSE sends a ping
every 15 s of silence, and the service's own upstream read timeout is 120 s, so a live
connection never waits this long."""
RETRIES = 5
"""Attempts in a row to resume a lost connection; with ``BACKOFF`` doubling, about 15 s,
well inside the service's resume grace (30 s by default)."""
BACKOFF = 0.5
BACKOFF_MAX = 8.0
RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""Statuses a proxy or a busy service answers for a moment: worth another attempt."""
SHOWN_MODELS = 12


class AskFailed(Exception):
    """The service refused the question, or the stream broke before the answer ended."""


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a tokenrelay service's address, or None when it can."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        return f"{url!r} is not a URL: {exc}"
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return f"{url!r} is not an http:// or https:// URL (like http://127.0.0.1:8000)"
    return None


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


@dataclass(frozen=True)
class ModelChoice:
    """What to ask for when the question names no model."""

    model: str | None  # None: send none, the service's default answers
    note: str | None  # for stderr: which model, and which upstream answers it


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def stream_answer(url: str, body: dict[str, Any], *, write: Callable[[str], Any], flush: Callable[[], Any],
                  timeout: float | None = None, key: str | None = None, announce: Callable[[str], Any] = _say,
                  on_stream: Callable[[str], Any] | None = None, retries: int = RETRIES) -> AskStats:
    """POST ``body`` to ``url`` (``…/api/get-response``) as SSE, writing the answer's text as
    it arrives.

    A body without a model gets the service's default, or — when the service has none, as
    with routes and no ``TOKENRELAY_MODEL`` — the first model it lists; ``announce`` is told
    which, and which upstream answers it. ``on_stream`` is told the answer's stream id (what
    ``DELETE /api/streams/{id}`` stops) as soon as it starts.

    A connection that drops before the answer's end (reset, closed, silent for ``timeout``,
    ``READ_TIMEOUT`` by default) is resumed: ``announce`` gets one line saying so, and
    ``GET /api/streams/{id}`` with ``Last-Event-ID`` brings the events after the last one
    written, so the text written is the uninterrupted answer's. ``retries`` attempts in a
    row, with a doubling backoff, then ``AskFailed`` naming the stream, which can still be
    resumed by hand (docs/resume.md)."""
    base = url.removesuffix(ANSWER_PATH)
    timeout = READ_TIMEOUT if timeout is None else timeout
    if "model" not in body:
        choice = choose_model(base, key=key)
        if choice.model is not None:
            body = {**body, "model": choice.model}
        if choice.note:
            announce(choice.note)
    headers = {"accept": "text/event-stream"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    stats = AskStats(started=time.perf_counter())
    reader = _AnswerReader(stats, write, flush, on_stream)
    with httpx.Client(timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT)) as client:
        try:
            with client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    refusal = refusal_message(response)
                    if "model_not_found" in refusal:
                        refusal += _listed_hint(base, key)
                    raise AskFailed(refusal)
                reader.read(response)
        except httpx.ConnectError as exc:
            raise AskFailed(f"cannot reach {url}: {exc}") from None
        except (httpx.TransportError, _Lost) as exc:
            if reader.stream_id is None:  # nothing to resume: the service never said which answer
                if isinstance(exc, httpx.TimeoutException):
                    raise AskFailed(f"no answer from {url} within {timeout:.0f} s") from None
                raise AskFailed(f"{url} closed the connection before answering: {_why(exc)}") from None
            _resume(client, base, headers, reader, lost=exc, announce=announce, retries=retries)
    stats.ended = time.perf_counter()
    return stats


class _Lost(Exception):
    """The connection ended before the answer's terminal event."""


class _AnswerReader:
    """Writes an answer's SSE text events, remembering its stream id and the last event id
    written, so that a resumed connection continues exactly there."""

    def __init__(self, stats: AskStats, write: Callable[[str], Any], flush: Callable[[], Any],
                 on_stream: Callable[[str], Any] | None) -> None:
        self.stats, self.write, self.flush, self.on_stream = stats, write, flush, on_stream
        self.stream_id: str | None = None
        self.last_id = 0

    def _started(self, stream_id: str) -> None:
        if self.stream_id is None and stream_id:
            self.stream_id = stream_id
            if self.on_stream is not None:
                self.on_stream(stream_id)

    def read(self, response: httpx.Response) -> None:
        """Until the terminal event; ``_Lost`` (or httpx's error) when the connection ends first."""
        if "x-stream-id" in response.headers:
            self._started(response.headers["x-stream-id"])
        decoder = SSEDecoder()
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                if self._handle(event):
                    return
        raise _Lost("the connection closed before the answer's end")

    def _handle(self, event: ServerSentEvent) -> bool:
        """Write or act on one event; True for the terminal one."""
        data = orjson.loads(event.data)
        if event.event == "message":
            seq = int(event.id) if event.id else self.last_id + 1
            if seq <= self.last_id:
                return False  # already written: a proxy that dropped Last-Event-ID replays from the start
            if seq != self.last_id + 1:
                raise AskFailed(f"the resumed answer skipped events {self.last_id + 1} to {seq - 1}; "
                                "what was printed is incomplete")
            self.last_id = seq
            stats = self.stats
            if stats.first_token is None:
                stats.first_token = time.perf_counter()
            stats.tokens += 1
            self.write(data["text"])
            self.flush()
        elif event.event == "start":
            self._started(str(data.get("stream_id") or ""))
        elif event.event == "done":
            usage = data.get("usage")
            if usage:
                self.stats.tokens = usage["completion_tokens"]
            return True
        elif event.event == "error":
            error = data["error"]
            raise AskFailed(f"the stream failed midway: {error['type']}: {error['message']}")
        elif event.event == "stopped":
            raise AskFailed(f"the answer was stopped ({data.get('reason') or 'stopped'}) before its end")
        return False


def _resume(client: httpx.Client, base: str, headers: dict[str, str], reader: _AnswerReader, *,
            lost: BaseException, announce: Callable[[str], Any], retries: int) -> None:
    """Reconnect to the answer until its end: up to ``retries`` attempts in a row that bring
    nothing new, waiting ``BACKOFF`` seconds, doubling, between them."""
    stream_id = reader.stream_id
    assert stream_id is not None
    url = f"{base}/api/streams/{stream_id}"
    announce(f"connection lost after event {reader.last_id} ({_why(lost)}); resuming…")
    failed = 0
    while True:
        before = reader.last_id
        try:
            with client.stream("GET", url, headers={**headers, "last-event-id": str(reader.last_id)}) as response:
                if response.status_code == 404:
                    raise AskFailed(f"cannot resume the answer after event {reader.last_id}: "
                                    f"{refusal_message(response)}")
                if response.status_code != 200:
                    if response.status_code not in RETRY_STATUSES:
                        raise AskFailed(f"cannot resume the answer (stream {stream_id}): {refusal_message(response)}")
                    raise _Lost(f"{response.status_code} {response.reason_phrase}")
                reader.read(response)
                return
        except (httpx.TransportError, _Lost) as exc:
            lost = exc
        if reader.last_id > before:  # it moved on before dropping again: a new loss, not a failed attempt
            failed = 0
            announce(f"connection lost after event {reader.last_id} ({_why(lost)}); resuming…")
            continue
        failed += 1
        if failed >= retries:
            raise AskFailed(
                f"the connection was lost after event {reader.last_id} and {retries} attempts to resume failed "
                f"({_why(lost)}). The answer may still be there for a while: resume it with\n"
                f"  curl -N {url} -H 'accept: text/event-stream' -H 'last-event-id: {reader.last_id}'")
        time.sleep(min(BACKOFF * 2 ** (failed - 1), BACKOFF_MAX))


def _why(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "no data for too long"
    return (str(exc) or type(exc).__name__).rstrip(".")


def choose_model(base: str, *, key: str | None, timeout: float = LOOKUP_TIMEOUT) -> ModelChoice:
    """The service's default model (left for the service to fill in), else the first model
    ``GET /v1/models`` lists. A service that cannot be asked is left to the question's own
    request to report; one with no default and no model listed is an error that says so."""
    info = _get_json(base + "/api/info", key, timeout)
    if not isinstance(info, dict):
        return ModelChoice(None, None)
    upstreams = _views(info.get("upstreams"))
    default = info.get("model")
    if isinstance(default, str) and default:
        return ModelChoice(None, f"model {default} (the service's default){_served_by(default, None, upstreams)}")
    listed = _get_json(base + "/v1/models", key, timeout)
    if isinstance(listed, _Refused):
        raise AskFailed(f"the service has no default model, and GET /v1/models answered {listed}; "
                        "name one with --model")
    models = _models(listed)
    if not models:
        raise AskFailed("the service has no default model and lists none at GET /v1/models; name one with --model")
    model, owner = models[0]
    names = [name for name, _ in models]
    return ModelChoice(model, f"no --model and no default model on the service: asking {model}, the first of "
                              f"{_some(names)}{_served_by(model, owner, upstreams)}")


@dataclass(frozen=True)
class _Refused:
    status: int
    reason: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


def _get_json(url: str, key: str | None, timeout: float) -> Any:
    """The JSON at ``url``; a ``_Refused`` for an error status; None when it cannot be had."""
    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    try:
        response = httpx.get(url, headers=headers, timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return _Refused(response.status_code, response.reason_phrase)
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None


def _models(listed: Any) -> list[tuple[str, str | None]]:
    """(model, upstream name) from an OpenAI model list, in its order."""
    data = listed.get("data") if isinstance(listed, dict) else None
    return [
        (str(item["id"]), str(item["owned_by"]) if item.get("owned_by") else None)
        for item in data or () if isinstance(item, dict) and item.get("id")
    ]


def _views(upstreams: Any) -> list[UpstreamView]:
    views = []
    for item in upstreams if isinstance(upstreams, list) else ():
        try:
            views.append(UpstreamView(str(item["name"]), str(item["kind"]), str(item["pattern"]),
                                      str(item["url"]) if item.get("url") else None))
        except (KeyError, TypeError, AttributeError):
            continue
    return views


def _served_by(model: str, owner: str | None, upstreams: Sequence[UpstreamView]) -> str:
    """`` → local (openai, http://…)``: the upstream named ``owner``, else the first whose
    pattern matches, as the service's router picks it."""
    view = next((v for v in upstreams if v.name == owner), None) if owner else None
    if view is None:
        view = next((v for v in upstreams if fnmatch.fnmatchcase(model, v.pattern)), None)
    return f", answered by {view.describe()}" if view else ""


def _few(names: Sequence[str]) -> str:
    more = f" and {len(names) - SHOWN_MODELS} more" if len(names) > SHOWN_MODELS else ""
    return ", ".join(names[:SHOWN_MODELS]) + more


def _some(names: Sequence[str]) -> str:
    return f"the models it lists ({_few(names)})"


def _listed_hint(base: str, key: str | None) -> str:
    """`` (models this service lists: …)`` for a refused model name, when the list can be had."""
    names = [name for name, _ in _models(_get_json(base + "/v1/models", key, LOOKUP_TIMEOUT))]
    return f" (models this service lists: {_few(names)})" if names else ""


def refusal_message(response: httpx.Response) -> str:
    response.read()
    hint = f"; pass the client key with --key (or set {KEY_ENV})" if response.status_code == 401 else ""
    try:
        error = orjson.loads(response.content)["error"]
        return f"{response.status_code} {error['type']}: {error['message']}{hint}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{response.status_code} {response.reason_phrase}{hint}"
