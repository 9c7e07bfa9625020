"""``tokenrelay doctor --resume``: does a dropped stream resume through the proxy?

It does what a client whose connection drops does (docs/resume.md): starts a short SSE
answer at ``POST /api/get-response`` through the given URL, reads a few events, drops the
connection, and resumes with ``GET /api/streams/{id}`` and ``Last-Event-ID``. It passes when
the resume brings exactly the events after the last one read (no gap, no duplicate), the
joined text is the stream's whole text as the service keeps it, and the answer was not
stopped by the drop (the resume grace held through the proxy).

What can fail, and what it means:

- the resume answers 404: it reached an instance that does not have the stream (several
  instances without a shared ``TOKENRELAY_REDIS_URL``), or the stream expired;
- another status for the resume (404 from the proxy itself, 405, 502): the proxy does not
  pass ``/api/streams/`` on;
- events replayed from the start: ``Last-Event-ID`` did not arrive (checked again with
  ``?after=N``, which a proxy leaves alone, to tell the proxy from the service);
- an ending ``stopped`` (``client_cancelled``/``abandoned``): leaving stopped the model, so a
  reload loses the answer (``TOKENRELAY_RESUME_GRACE=0``, or a proxy that holds the reconnect
  longer than the grace).

Unlike the probe, this asks the model: a short question, ``max_tokens`` bounded. The answer
is stopped (``DELETE``) when the check cannot follow it to its end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from .providers.sse_decoder import SSEDecoder

PROMPT = "Count from 1 to 40, one number per line, nothing else."
MAX_TOKENS = 160
READ_FIRST = 3
"""Events read before the connection is dropped."""
TIMEOUT = 60.0

Outcome = Literal["ok", "not_found", "unroutable", "header_dropped", "ignored_cursor", "gap", "stopped",
                  "incomplete", "refused", "error"]


@dataclass
class ResumeCheck:
    url: str
    outcome: Outcome = "error"
    stream_id: str | None = None
    first_ids: list[int] = field(default_factory=list)
    resumed_ids: list[int] = field(default_factory=list)
    ending: str | None = None
    """The resumed stream's terminal event: done, error or stopped (with its reason)."""
    ended_before_drop: bool = False
    status: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "ok": self.ok, "outcome": self.outcome, "stream_id": self.stream_id,
                "read_before_drop": self.first_ids, "resumed_ids": _span(self.resumed_ids),
                "ending": self.ending, "ended_before_drop": self.ended_before_drop,
                "status": self.status, "detail": self.detail}


def _span(ids: list[int]) -> list[int]:
    return [ids[0], ids[-1]] if ids else []


def site_url(base: str, path: str) -> str:
    """``path`` under the site ``base`` names (a prefix is kept; a probe URL is cut back)."""
    parts = urlsplit(base if "://" in base else "http://" + base)
    prefix = parts.path.rstrip("/").removesuffix("/api/probe")
    return urlunsplit((parts.scheme, parts.netloc, prefix + path, "", ""))


@dataclass
class _Read:
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    ending: str | None = None
    stream_id: str | None = None


def _read_events(response: httpx.Response, into: _Read, *, stop_after: int | None = None) -> None:
    decoder = SSEDecoder()
    for chunk in response.iter_raw():
        for event in decoder.feed(chunk):
            data = orjson.loads(event.data)
            if event.event == "start":
                into.stream_id = into.stream_id or data.get("stream_id")
            elif event.event == "message":
                into.ids.append(int(event.id or 0))
                into.text.append(data["text"])
                if stop_after is not None and len(into.ids) >= stop_after:
                    return
            elif event.event in ("done", "error", "stopped"):
                reason = data.get("reason") or (data.get("error") or {}).get("type")
                into.ending = f"{event.event} ({reason})" if reason else event.event
                return


def check_resume(base: str, *, key: str | None = None, model: str | None = None,
                 headers: dict[str, str] | None = None) -> ResumeCheck:
    check = ResumeCheck(url=site_url(base, "/api/get-response"))
    auth = {"authorization": f"Bearer {key}"} if key else {}
    sse = {**(headers or {}), **auth, "accept": "text/event-stream"}
    body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
    if model:
        body["model"] = model
    first = _Read()
    try:
        with httpx.Client(timeout=httpx.Timeout(TIMEOUT, connect=10.0), follow_redirects=True) as client:
            # A connection of its own, closed with the read half done: the drop is real.
            with httpx.Client(timeout=httpx.Timeout(TIMEOUT, connect=10.0), follow_redirects=True) as dropped:
                with dropped.stream("POST", check.url, json=body, headers=sse) as response:
                    check.status = response.status_code
                    if response.status_code != 200:
                        check.outcome = "refused"
                        check.detail = _excerpt(response)
                        return check
                    first.stream_id = response.headers.get("x-stream-id")
                    _read_events(response, first, stop_after=READ_FIRST)
            check.stream_id = first.stream_id
            check.first_ids = first.ids
            check.ended_before_drop = first.ending is not None
            if check.stream_id is None:
                check.detail = "the answer carried no stream id (X-Stream-Id, or the start event's stream_id)"
                return check
            try:
                _resume(client, base, check, first, sse, auth)
            finally:
                if check.ending is None or not check.ok:
                    # Do not leave the model writing an answer nobody reads.
                    client.delete(site_url(base, f"/api/streams/{check.stream_id}"), headers=auth)
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: an event that is not tokenrelay's JSON
        check.outcome = "error"
        check.detail = f"{type(exc).__name__}: {exc}"
    return check


def _resume(client: httpx.Client, base: str, check: ResumeCheck, first: _Read, sse: dict[str, str],
            auth: dict[str, str]) -> None:
    last = first.ids[-1] if first.ids else 0
    url = site_url(base, f"/api/streams/{check.stream_id}")
    resumed = _Read()
    with client.stream("GET", url, headers={**sse, "last-event-id": str(last)}) as response:
        check.status = response.status_code
        if response.status_code == 404 and _is_tokenrelay_error(response):
            check.outcome = "not_found"
            check.detail = _excerpt(response)
            return
        if response.status_code != 200:
            check.outcome = "unroutable"
            check.detail = _excerpt(response)
            return
        _read_events(response, resumed)
    check.resumed_ids = resumed.ids
    check.ending = resumed.ending
    if resumed.ids and resumed.ids[0] <= last:
        # Replayed from the start: did the header not arrive, or did the service ignore it?
        with client.stream("GET", url + f"?after={last}", headers=sse) as again:
            fixed = _Read()
            _read_events(again, fixed)
        check.outcome = "header_dropped" if fixed.ids[:1] == [last + 1] or (not fixed.ids and fixed.ending) \
            else "ignored_cursor"
        check.detail = f"asked for the events after {last}, got events from {resumed.ids[0]}"
        return
    expected = list(range(last + 1, last + 1 + len(resumed.ids)))
    if resumed.ids != expected:
        check.outcome = "gap"
        check.detail = f"after event {last} came events {_span(resumed.ids)} (expected {last + 1} on, dense)"
        return
    if resumed.ending is None:
        check.outcome = "incomplete"
        check.detail = "the resumed stream ended without its terminal event"
        return
    if resumed.ending.startswith("stopped") and not check.ended_before_drop:
        check.outcome = "stopped"
        check.detail = f"the answer ended {resumed.ending} after the connection was dropped"
        return
    kept = client.get(url, headers={**auth, "accept": "application/json"})
    if kept.status_code == 200:
        text = "".join(first.text) + "".join(resumed.text)
        if kept.json().get("text") != text:
            check.outcome = "gap"
            check.detail = "the text read before the drop and after the resume is not the stream's text"
            return
    check.outcome = "ok"


def _is_tokenrelay_error(response: httpx.Response) -> bool:
    response.read()
    try:
        return "error" in orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return False


def _excerpt(response: httpx.Response) -> str:
    response.read()
    try:
        error = orjson.loads(response.content)["error"]
        return f"{response.status_code} {error['type']}: {error['message']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:120].strip()}"


def describe(check: ResumeCheck) -> tuple[str, list[str]]:
    """The report's sentence for the check, and the fixes when it failed."""
    last = check.first_ids[-1] if check.first_ids else 0
    if check.ok:
        how = (f"read events 1–{last}, dropped the connection, resumed with Last-Event-ID and got "
               f"{_range(check.resumed_ids)} then `{check.ending}`: no gap, no duplicate")
        if check.ended_before_drop:
            how += " (the answer had ended before the drop, so the resume grace was not exercised)"
        else:
            how += ", and the model went on while nobody read"
        return f"A dropped stream resumes through {check.url.rsplit('/api/', 1)[0]}: {how}.", []
    multi = ("Several instances behind the proxy need one shared stream store: the same "
             "TOKENRELAY_REDIS_URL on every instance (deploy/nginx/tokenrelay-multi.conf, docs/deploy.md); "
             "without Redis, keep each client on one instance (nginx `ip_hash;`, or sticky sessions), or run "
             "one instance.")
    if check.outcome == "not_found":
        return (f"Resuming a dropped stream FAILED: GET /api/streams/{{id}} answered {check.detail}. The reconnect "
                "reached a tokenrelay that does not have the stream.", [multi])
    if check.outcome == "unroutable":
        return (f"Resuming a dropped stream FAILED: GET /api/streams/{{id}} answered {check.detail}, not "
                "tokenrelay's stream.", ["Route /api/streams/ to tokenrelay like the other stream routes "
                                          "(deploy/nginx/tokenrelay.conf's stream location covers it)."])
    if check.outcome == "header_dropped":
        return (f"Resuming a dropped stream FAILED: {check.detail} — the Last-Event-ID header does not reach "
                "tokenrelay (with ?after=N the resume is right), so a browser's reconnect repeats the text.",
                ["Pass the Last-Event-ID request header on: nginx passes request headers unless told "
                 "otherwise (look for `proxy_set_header Last-Event-ID \"\";` or `proxy_pass_request_headers "
                 "off;`); a CDN or WAF rule that strips unknown headers must allow it."])
    if check.outcome == "ignored_cursor":
        return (f"Resuming a dropped stream FAILED: {check.detail}, with Last-Event-ID and with ?after=N alike.",
                ["Upgrade tokenrelay: this one does not resume from a cursor."])
    if check.outcome == "stopped":
        return (f"Resuming a dropped stream FAILED: {check.detail}: leaving stopped the model, so a reload "
                "loses the answer.",
                ["Set TOKENRELAY_RESUME_GRACE above 0 (30 s by default) on the service, so that the answer goes "
                 "on for that long after its reader leaves."])
    if check.outcome == "refused":
        fixes = ["Name a model with --model."] if check.status in (404, 422) else []
        if check.status == 401:
            fixes = ["Pass a client key with --key (or TOKENRELAY_API_KEY)."]
        return f"The resume check could not start an answer: {check.detail}.", fixes
    return f"Resuming a dropped stream FAILED: {check.detail or check.outcome}.", [multi] if check.outcome == "gap" else []


def _range(ids: list[int]) -> str:
    if not ids:
        return "no further events"
    return f"events {ids[0]}–{ids[-1]}" if len(ids) > 1 else f"event {ids[0]}"
