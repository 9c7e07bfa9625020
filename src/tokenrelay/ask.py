"""The client side of ``tokenrelay ask``: stream an answer from a tokenrelay service."""

from __future__ import annotations

import codecs
import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from .providers.sse_decoder import SSEDecoder
from .upstreams import UpstreamView

ANSWER_PATH = "/api/get-response"
KEY_ENV = "TOKENRELAY_API_KEY"
LOOKUP_TIMEOUT = 10.0
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


def stream_answer(url: str, body: dict[str, Any], *, sse: bool, write: Callable[[str], Any],
                  flush: Callable[[], Any], timeout: float = 600.0, key: str | None = None,
                  announce: Callable[[str], Any] = _say,
                  on_stream: Callable[[str], Any] | None = None) -> AskStats:
    """POST ``body`` to ``url`` (``…/api/get-response``), writing the answer as it arrives.

    A body without a model gets the service's default, or — when the service has none, as
    with routes and no ``TOKENRELAY_MODEL`` — the first model it lists; ``announce`` is told
    which, and which upstream answers it. ``on_stream`` is told the answer's stream id (what
    ``DELETE /api/streams/{id}`` stops) as soon as it starts."""
    base = url.removesuffix(ANSWER_PATH)
    if "model" not in body:
        choice = choose_model(base, key=key)
        if choice.model is not None:
            body = {**body, "model": choice.model}
        if choice.note:
            announce(choice.note)
    headers = {"accept": "text/event-stream" if sse else "text/plain"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    stats = AskStats(started=time.perf_counter())
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0)) as client:
            with client.stream("POST", url, json=body, headers=headers) as response:
                if response.status_code != 200:
                    refusal = refusal_message(response)
                    if "model_not_found" in refusal:
                        refusal += _listed_hint(base, key)
                    raise AskFailed(refusal)
                if on_stream is not None and "x-stream-id" in response.headers:
                    on_stream(response.headers["x-stream-id"])
                if sse:
                    _read_sse(response, stats, write, flush)
                else:
                    _read_text(response, stats, write, flush)
    except httpx.ConnectError as exc:
        raise AskFailed(f"cannot reach {url}: {exc}") from None
    except httpx.TimeoutException:
        raise AskFailed(f"no answer from {url} within {timeout:.0f} s") from None
    except httpx.HTTPError as exc:
        if stats.first_token is None:
            raise AskFailed(f"{url} closed the connection before answering: {exc}") from None
        if sse:  # an SSE answer that breaks off without its error event: the connection itself broke
            raise AskFailed(f"the answer broke off midway and is incomplete: {exc}") from None
        # A plain-text body has no room for the reason: the service ends the response
        # abruptly, which is all the client sees.
        raise AskFailed("the answer broke off midway and is incomplete; ask again with --sse "
                        "to see the reason") from None
    stats.ended = time.perf_counter()
    return stats


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
