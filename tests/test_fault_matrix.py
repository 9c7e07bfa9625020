"""The fault matrix, upstream × client: every way a model API can fail, seen from every way a
client can ask (docs/security.md has the table, with each cell's outcome).

One scripted upstream on loopback plays each fault (the request's model picks it:
``fault-drop``, ``fault-stall-head``…), in front of it one real ``tokenrelay serve``; each
cell is one client asking through it — plain text, SSE, one JSON answer, ``/v1`` streamed and
whole, a job — and all cells run at once, each bounded in time. What each client must see:
an honest status before the first byte; after it, an in-band error (SSE ``event: error``,
``/v1``'s ``data: {"error": …}``) or a body broken off (plain text); never a short answer
that looks complete; a job ends ``failed`` with the error. An answer that is whole (a slow
upstream, a compressed one) arrives whole."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import resource
import selectors
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from scripted import chunked, in_thread, serving, until
from servers import RelayServer
from tokenrelay.providers.sse_decoder import MAX_LINE
from tokenrelay.streaming.openai_relay import MAX_WHOLE_BODY

READ_TIMEOUT = 2.0
"""The relay's longest upstream silence: the stall cells end after it."""
CELL_TIMEOUT = 40.0
TEXT = "Hello world"
ANSWER = orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": TEXT}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}})


def event(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


FIRST = event("Hello")
STREAM = FIRST + event(" world") + event(finish="stop") + b"data: [DONE]\n\n"
SSE_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"connection: close\r\n")


def json_head(length: int, extra: bytes = b"", content_type: bytes = b"application/json") -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: " + content_type + b"\r\ncontent-length: %d\r\n" % length
            + b"connection: close\r\n" + extra + b"\r\n")


# --- the upstream: one script per fault ---

Reader, Writer = asyncio.StreamReader, asyncio.StreamWriter

GATES: dict[str, threading.Event] = {}
"""Per cell (its model name): set once its client has the answer's first piece, so a fault
``midway`` happens after the first byte reached the client, not within the same read."""


async def midway(model: str) -> None:
    await until(GATES[model].is_set, CELL_TIMEOUT)


async def until_hung_up(reader: Reader) -> None:
    """Say nothing more until the relay gives up and closes the connection."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(CELL_TIMEOUT):
            while await reader.read(65536):
                pass


async def drop(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    # Hang up midway: no terminating chunk, or fewer bytes than the content-length said.
    writer.write(SSE_HEAD + b"\r\n" + chunked(FIRST) if stream else json_head(len(ANSWER)) + ANSWER[:40])
    await writer.drain()
    await midway(model)


async def stall_head(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    await until_hung_up(reader)


async def stall_body(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    writer.write(SSE_HEAD + b"\r\n" + chunked(FIRST) if stream else json_head(len(ANSWER)) + ANSWER[:40])
    await writer.drain()
    await midway(model)
    await until_hung_up(reader)


async def one_byte_a_second(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    # The answer, then its last bytes one a second: longer in all than the relay's read
    # timeout, never silent as long as it.
    slow = 6
    body = STREAM if stream else ANSWER
    head = SSE_HEAD + b"\r\n" + chunked(body[:-slow]) if stream else json_head(len(body)) + body[:-slow]
    writer.write(head)
    await writer.drain()
    for byte in body[-slow:]:
        await asyncio.sleep(1)
        writer.write(chunked(bytes([byte])) if stream else bytes([byte]))
        await writer.drain()
    if stream:
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def refusal(status: bytes, extra: bytes = b"") -> Callable[[Reader, Writer, bool, str], Awaitable[None]]:
    async def refuse(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
        body = orjson.dumps({"error": {"message": "the scripted upstream says no", "type": "server_error"}})
        writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                     b"connection: close\r\n" % len(body) + extra + b"\r\n" + body)
        await writer.drain()

    return refuse


async def html(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    page = b"<html><body>Welcome to the captive portal</body></html>"
    writer.write(json_head(len(page), content_type=b"text/html") + page)
    await writer.drain()


async def gzipped(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    body = gzip.compress(STREAM if stream else ANSWER)
    if stream:
        half = len(body) // 2
        writer.write(SSE_HEAD + b"content-encoding: gzip\r\n\r\n" + chunked(body[:half]))
        await writer.drain()
        writer.write(chunked(body[half:]) + b"0\r\n\r\n")
    else:
        writer.write(json_head(len(body), b"content-encoding: gzip\r\n") + body)
    await writer.drain()


async def not_utf8(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    if stream:  # a good first piece, then a Latin-1 one
        writer.write(SSE_HEAD + b"\r\n" + chunked(FIRST))
        await writer.drain()
        await midway(model)
        latin1 = event(" wörld").replace("ö".encode(), "ö".encode("latin-1"))
        writer.write(chunked(latin1) + chunked(event(finish="stop") + b"data: [DONE]\n\n") + b"0\r\n\r\n")
    else:
        body = ANSWER.replace(b"world", "wörld".encode("latin-1"))
        writer.write(json_head(len(body)) + body)
    await writer.drain()


async def huge_line(reader: Reader, writer: Writer, stream: bool, model: str) -> None:
    # One line that never ends, past the cap on a line (streamed) or on a whole answer.
    piece = b"a" * 65536
    cap = MAX_LINE if stream else MAX_WHOLE_BODY
    if stream:
        writer.write(SSE_HEAD + b"\r\n" + chunked(b'data: {"choices":[{"delta":{"content":"'))
    else:
        writer.write(json_head(cap * 2) + b'{"choices":[{"message":{"content":"')
    for _ in range(cap // len(piece) + 2):
        writer.write(chunked(piece) if stream else piece)
        await writer.drain()
    await until_hung_up(reader)


FAULTS: dict[str, Callable[[Reader, Writer, bool, str], Awaitable[None]]] = {
    "drop": drop,
    "stall-head": stall_head,
    "stall-body": stall_body,
    "1-byte-a-second": one_byte_a_second,
    "429": refusal(b"429 Too Many Requests", b"retry-after: 7\r\n"),
    "5xx": refusal(b"500 Internal Server Error"),
    "html": html,
    "gzip": gzipped,
    "not-utf8": not_utf8,
    "huge-line": huge_line,
}


async def upstream(reader: Reader, writer: Writer) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    body = json.loads(await reader.readexactly(lengths[0]))
    model = body["model"]
    await FAULTS[model.removeprefix("fault-").partition(".")[0]](reader, writer, bool(body.get("stream")), model)


@pytest.fixture(scope="module")
def upstream_url() -> Iterator[str]:
    """The scripted upstream, on an event loop of its own thread."""

    @contextlib.asynccontextmanager
    async def url() -> AsyncIterator[str]:
        async with serving(upstream, path="/v1") as (base, _):
            yield str(base)

    with in_thread(url, join=CELL_TIMEOUT + 10) as base:
        yield base


# --- the clients ---

@dataclass(frozen=True)
class Seen:
    """What one client saw, in a word or three: ``502 upstream_protocol_error``,
    ``200 event: error upstream_timeout``, ``200 broken off``, ``200 whole``, ``failed upstream_…``."""

    outcome: str
    text: str = ""
    seconds: float = 0.0


def error_type(response_body: bytes) -> str:
    error = orjson.loads(response_body)["error"]
    return str(error.get("code") or error["type"])


async def text(http: httpx.AsyncClient, model: str) -> Seen:
    body = b""
    async with http.stream("POST", "/api/get-response", json={"model": model, "messages": USER}) as response:
        try:
            async for piece in response.aiter_bytes():
                body += piece
                if b"Hello" in body:
                    GATES[model].set()
        except httpx.TransportError:  # the body broke off without its terminating chunk
            return Seen(f"{response.status_code} broken off", body.decode(errors="replace"))
    if response.status_code != 200:
        return Seen(f"{response.status_code} {error_type(body)}")
    return Seen("200 whole", body.decode())


def sse_events(raw: bytes) -> list[tuple[str, str]]:
    events = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        name, data = "message", []
        for line in block.decode().split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        if data:
            events.append((name, "\n".join(data)))
    return events


async def read_all(http: httpx.AsyncClient, path: str, body: dict[str, object],
                   headers: dict[str, str] | None = None) -> tuple[int, bytes, bool]:
    raw, broken = b"", False
    async with http.stream("POST", path, json=body, headers=headers) as response:
        try:
            async for piece in response.aiter_bytes():
                raw += piece
                if b"Hello" in raw:
                    GATES[str(body["model"])].set()
        except httpx.TransportError:
            broken = True
    return response.status_code, raw, broken


async def sse(http: httpx.AsyncClient, model: str) -> Seen:
    status, raw, broken = await read_all(http, "/api/get-response", {"model": model, "messages": USER},
                                         {"accept": "text/event-stream"})
    if status != 200:
        return Seen(f"{status} {error_type(raw)}")
    events = sse_events(raw)
    said = "".join(orjson.loads(data)["text"] for name, data in events if name == "message")
    last, data = events[-1]
    if last == "error":
        return Seen(f"200 event: error {error_type(data.encode())}", said)
    if last == "done" and not broken:
        return Seen("200 whole", said)
    return Seen(f"200 cut after event: {last}", said)


async def one_shot(http: httpx.AsyncClient, model: str) -> Seen:
    status, raw, broken = await read_all(http, "/api/get-response", {"model": model, "messages": USER,
                                                                      "stream": False})
    if status != 200:
        return Seen(f"{status} {error_type(raw)}")
    return Seen("200 broken off" if broken else "200 whole", "" if broken else orjson.loads(raw)["text"])


async def v1_stream(http: httpx.AsyncClient, model: str) -> Seen:
    status, raw, broken = await read_all(http, "/v1/chat/completions",
                                         {"model": model, "messages": USER, "stream": True})
    if status != 200:
        return Seen(f"{status} {error_type(raw)}")
    said, last, garbled = "", None, ""
    for _, data in sse_events(raw):
        last = data
        if data == "[DONE]":
            continue
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            garbled = "an unfinished line, then "
            continue
        if "error" in chunk:
            return Seen(f"200 {garbled}data: error {chunk['error'].get('code') or chunk['error']['type']}", said)
        said += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
    if last == "[DONE]" and not broken:
        return Seen("200 whole", said)
    return Seen("200 cut without [DONE]", said)


async def v1_whole(http: httpx.AsyncClient, model: str) -> Seen:
    status, raw, broken = await read_all(http, "/v1/chat/completions", {"model": model, "messages": USER})
    if status != 200:
        return Seen(f"{status} {error_type(raw)}")
    if broken:
        return Seen("200 broken off")
    return Seen("200 whole", orjson.loads(raw)["choices"][0]["message"]["content"])


async def job(http: httpx.AsyncClient, model: str) -> Seen:
    response = await http.post("/api/jobs", json={"model": model, "messages": USER})
    if response.status_code != 202:
        return Seen(f"{response.status_code} {error_type(response.content)}")
    url = f"/api/jobs/{response.json()['id']}"
    while (state := (await http.get(url)).json())["status"] in ("queued", "running"):
        await asyncio.sleep(0.1)
    if state["status"] == "succeeded":
        return Seen("succeeded", state["result"]["text"])
    return Seen(f"{state['status']} {state['error']['type']}", (state["result"] or {}).get("text", ""))


USER = [{"role": "user", "content": "hi"}]
CLIENTS: dict[str, Callable[[httpx.AsyncClient, str], Awaitable[Seen]]] = {
    "text": text, "sse": sse, "one-shot": one_shot, "v1-stream": v1_stream, "v1-whole": v1_whole, "job": job,
}


@pytest.fixture(scope="module")
def seen(start_relay: Callable[..., RelayServer], upstream_url: str) -> dict[tuple[str, str], Seen]:
    """Every cell, all at once through one relay: what each client saw."""
    relay = start_relay(upstream=upstream_url, TOKENRELAY_READ_TIMEOUT=str(READ_TIMEOUT), TOKENRELAY_RETRIES="0",
                        # No spare connection: every connection the upstream sees carries a request.
                        TOKENRELAY_SPARE_CONNECTION="false", TOKENRELAY_JOB_CONCURRENCY="100")

    async def cell(http: httpx.AsyncClient, fault: str, client: str) -> tuple[tuple[str, str], Seen]:
        model = f"fault-{fault}.{client}"
        GATES[model] = threading.Event()
        if client in ("one-shot", "v1-whole", "job"):
            GATES[model].set()  # these clients see nothing before the end: no first piece to wait for
        began = time.monotonic()
        try:
            async with asyncio.timeout(CELL_TIMEOUT):
                result = await CLIENTS[client](http, model)
        except TimeoutError:
            result = Seen(f"no end within {CELL_TIMEOUT:g} s")
        except Exception as exc:  # noqa: BLE001  # the cell's assertion shows what the client could not read
            result = Seen(f"unreadable: {exc!r}"[:300])
        return (fault, client), Seen(result.outcome, result.text, time.monotonic() - began)

    async def everything() -> dict[tuple[str, str], Seen]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=relay.url, timeout=CELL_TIMEOUT, limits=limits) as http:
            return dict(await asyncio.gather(*(cell(http, f, c) for f in FAULTS for c in CLIENTS)))

    return asyncio.run(everything())


# --- what each cell must be ---

WHOLE = {client: "succeeded" if client == "job" else "200 whole" for client in CLIENTS}
EXPECTED: dict[str, dict[str, str]] = {
    "drop": {"text": "200 broken off", "sse": "200 event: error upstream_unavailable",
             "one-shot": "502 upstream_unavailable", "v1-stream": "200 data: error upstream_unavailable",
             "v1-whole": "502 upstream_unavailable", "job": "failed upstream_unavailable"},
    "stall-head": {"text": "504 upstream_timeout", "sse": "504 upstream_timeout", "one-shot": "504 upstream_timeout",
                   "v1-stream": "504 upstream_timeout", "v1-whole": "504 upstream_timeout",
                   "job": "failed upstream_timeout"},
    "stall-body": {"text": "200 broken off", "sse": "200 event: error upstream_timeout",
                   "one-shot": "504 upstream_timeout", "v1-stream": "200 data: error upstream_timeout",
                   "v1-whole": "504 upstream_timeout", "job": "failed upstream_timeout"},
    "1-byte-a-second": WHOLE,
    "429": {client: "failed upstream_rate_limited" if client == "job" else "429 upstream_rate_limited"
            for client in CLIENTS},
    "5xx": {client: "failed upstream_error" if client == "job" else "502 upstream_error" for client in CLIENTS},
    "html": {client: "failed upstream_protocol_error" if client == "job" else "502 upstream_protocol_error"
             for client in CLIENTS},
    "gzip": WHOLE,
    "not-utf8": {"text": "200 broken off", "sse": "200 event: error upstream_protocol_error",
                 "one-shot": "502 upstream_protocol_error", "v1-stream": "200 data: error upstream_protocol_error",
                 "v1-whole": "502 upstream_protocol_error", "job": "failed upstream_protocol_error"},
    # SSE has sent its start event when the line begins; /v1 sends whole events only (each gets
    # its id: line first), so with the line as the first event nothing has been sent: a 502.
    "huge-line": {"text": "502 upstream_protocol_error", "sse": "200 event: error upstream_protocol_error",
                  "one-shot": "502 upstream_protocol_error",
                  "v1-stream": "502 upstream_protocol_error",
                  "v1-whole": "502 upstream_protocol_error", "job": "failed upstream_protocol_error"},
}


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_cell(seen: dict[tuple[str, str], Seen], fault: str, client: str) -> None:
    cell = seen[(fault, client)]
    assert cell.outcome == EXPECTED[fault][client], cell
    if cell.outcome in ("200 whole", "succeeded"):
        assert cell.text == TEXT, cell  # whole means the whole answer
    else:
        # Never a short answer that looks complete: what arrived before the failure is a
        # prefix of the answer, and the outcome above says it is not all of it.
        assert TEXT.startswith(cell.text), cell
    assert cell.seconds < CELL_TIMEOUT - 5, cell


def test_the_matrix_ran_at_once(seen: dict[tuple[str, str], Seen]) -> None:
    """The slowest cell bounds the whole matrix: cells ran together, not one after another."""
    assert max(cell.seconds for cell in seen.values()) < 30, {k: round(v.seconds, 1) for k, v in seen.items()}




# --- the process row: serve killed mid-stream (mid-job and mid-delivery: test_jobs_restart.py) ---

def test_sigkill_serve_mid_stream_breaks_every_stream_off(start_relay: Callable[..., RelayServer]) -> None:
    """``serve`` killed while answers stream: each client's body breaks off — text without
    its terminating chunk, SSE without ``done``, ``/v1`` without ``[DONE]`` — so none takes
    what it had for the whole answer."""
    relay = start_relay(upstream=None)
    slow = {"model": "sim:ttft=0,tps=20,tokens=400", "messages": USER}
    asks = {"text": ("/api/get-response", slow, {}),
            "sse": ("/api/get-response", slow, {"accept": "text/event-stream"}),
            "v1-stream": ("/v1/chat/completions", {**slow, "stream": True}, {})}
    with contextlib.ExitStack() as stack:
        http = stack.enter_context(httpx.Client(base_url=relay.url, timeout=30))
        streams = {name: stack.enter_context(http.stream("POST", path, json=body, headers=headers))
                   for name, (path, body, headers) in asks.items()}
        readers = {name: response.iter_raw() for name, response in streams.items()}
        received = {name: next(reader) for name, reader in readers.items()}  # each is under way
        relay.proc.kill()
        relay.proc.wait(10)
        for name, reader in readers.items():
            with pytest.raises(httpx.TransportError):
                for piece in reader:
                    received[name] += piece
    assert received["text"]
    assert b"event: start" in received["sse"] and b"event: done" not in received["sse"]
    assert b"data: [DONE]" not in received["v1-stream"]


# --- the connections row: 2,000 idle (slowloris and oversize headers: test_exposure.py) ---

IDLE = 2000


def test_2000_idle_connections_are_closed_and_the_service_answers_meanwhile(
        start_relay: Callable[..., RelayServer]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < IDLE + 100:
        pytest.skip(f"the hard open-file limit is {hard}: this test's own {IDLE} sockets do not fit")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, IDLE + 100), hard))
    relay = start_relay(upstream=None, TOKENRELAY_HEADER_TIMEOUT="2")
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE):
            idle.append(socket.create_connection(("127.0.0.1", relay.port), timeout=10))
        started = time.monotonic()
        assert httpx.get(relay.url + "/healthz", timeout=10).status_code == 200  # not starved by them
        # Each silent connection is closed by the server after the header timeout.
        with selectors.DefaultSelector() as selector:
            for sock in idle:
                selector.register(sock, selectors.EVENT_READ)
            open_ = set(idle)
            while open_ and time.monotonic() - started < 30:
                for key, _ in selector.select(timeout=1):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    with contextlib.suppress(ConnectionError):
                        if sock.recv(1024):
                            continue  # a closing answer; the close follows
                    selector.unregister(sock)
                    open_.discard(sock)
        assert not open_, f"{len(open_)} of {IDLE} idle connections still open after 30 s"
    finally:
        for sock in idle:
            sock.close()
