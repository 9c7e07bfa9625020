"""An upstream that breaks the protocol gets a clear upstream error, never a success the SDK
chokes on, nor unbounded work: a gzip body, an HTML page behind a 200, bytes that are not
UTF-8, an event-stream line that never ends. The upstream is a scripted HTTP server on
loopback (the request's ``model`` picks the script); the relay and the official SDK are real."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from sdk import client, close_clients  # noqa: F401  (the fixture closes the clients)
from servers import RelayServer
from tokenrelay.errors import UpstreamProtocolError
from tokenrelay.providers.sse_decoder import MAX_LINE, SSEDecoder

USER = [{"role": "user", "content": "hi"}]
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "Grüße ✓"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def event(content: str | None = None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    return b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


class Script(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    release = threading.Event()  # what a stalled script waits for before it hangs up
    go_on = threading.Event()  # set by the test once the client has the first piece

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        getattr(self, "script_" + body["model"].replace("-", "_"))()

    def send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in {**headers, "content-length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def stream(self, *pieces: bytes, stall: bool = False, pause_after: int = -1) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i, piece in enumerate(pieces):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            if i == pause_after:
                self.go_on.wait(30)
        if stall:
            self.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")

    def script_gzip(self) -> None:
        self.send(200, {"content-type": "application/json", "content-encoding": "gzip"},
                  gzip.compress(orjson.dumps(ANSWER)))

    def script_html(self) -> None:
        self.send(200, {"content-type": "text/html"}, b"<html><body>Welcome to the captive portal</body></html>")

    def script_latin1(self) -> None:
        self.send(200, {"content-type": "application/json"},
                  orjson.dumps(ANSWER).replace("Grüße".encode(), "Grüße".encode("latin-1")))

    def script_brotli(self) -> None:
        self.send(200, {"content-type": "application/json", "content-encoding": "br"}, b"\x1b\x00")

    def script_latin1_first(self) -> None:
        self.stream(event("Grüße").replace("ü".encode(), b"\xfc"))

    def script_latin1_later(self) -> None:
        self.stream(event("ok"), event("café").replace("é".encode(), b"\xe9"), event(finish="stop"),
                    b"data: [DONE]\n\n", pause_after=0)

    def script_long_line(self) -> None:
        # One event-stream line that never ends, sent in 64 kB pieces, then silence.
        piece = b"a" * 65536
        self.stream(b"data: " + piece, *([piece] * ((MAX_LINE + 2 * 65536) // 65536)), stall=True)


class Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the relay hanging up on a script it refused (the endless line) is expected


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    server = Upstream(("127.0.0.1", 0), Script)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    Script.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def relay(start_relay: Callable[..., RelayServer], upstream: str) -> RelayServer:
    return start_relay(upstream=upstream, TOKENRELAY_READ_TIMEOUT="20", TOKENRELAY_RETRIES="0")


def test_gzip_answer_reaches_the_sdk_decoded(relay: RelayServer) -> None:
    completion = client(relay).chat.completions.create(model="gzip", messages=USER)
    assert completion.choices[0].message.content == "Grüße ✓"
    assert completion.usage is not None and completion.usage.total_tokens == 3


@pytest.mark.parametrize("model, words", [("html", "not JSON (text/html)"), ("latin1", "not JSON"),
                                          ("brotli", "'br'")])
def test_answer_that_is_not_json_is_a_502_in_openai_shape(relay: RelayServer, model: str, words: str) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client(relay).chat.completions.create(model=model, messages=USER)
    assert caught.value.status_code == 502
    body = caught.value.response.json()
    assert body["error"]["code"] == "upstream_protocol_error" and words in body["error"]["message"], body


def test_stream_not_utf8_from_the_start_is_a_502(relay: RelayServer) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        list(client(relay).chat.completions.create(model="latin1-first", messages=USER, stream=True))
    assert caught.value.status_code == 502
    assert "not UTF-8" in caught.value.response.json()["error"]["message"]


def test_stream_not_utf8_midway_ends_in_an_error_event(relay: RelayServer) -> None:
    texts = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client(relay).chat.completions.create(model="latin1-later", messages=USER, stream=True):
            texts.append(chunk.choices[0].delta.content if chunk.choices else None)
            Script.go_on.set()
    assert texts == ["ok"]
    assert "not UTF-8" in caught.value.message
    assert not isinstance(caught.value, openai.APIStatusError)  # in-band: the status was already 200


def test_endless_line_is_refused_at_the_cap_not_held(relay: RelayServer) -> None:
    started = time.monotonic()
    response = httpx.post(relay.url + "/api/get-response", json={"model": "long-line", "messages": USER}, timeout=30)
    assert response.status_code == 502, response.text
    assert response.json()["error"]["type"] == "upstream_protocol_error"
    assert "longer than 4 MiB" in response.json()["error"]["message"]
    # Refused as soon as the line passed the cap, not when the upstream gave up (20 s).
    assert time.monotonic() - started < 15


def test_sse_decoder_buffers_a_long_line_in_linear_time() -> None:
    decoder = SSEDecoder()
    line = b"data: " + b"x" * (3 << 20)
    started = time.process_time()
    for i in range(0, len(line), 512):  # 6,000 pieces: joining at each one would copy ~9 GB
        assert decoder.feed(line[i:i + 512]) == []
    events = decoder.feed(b"\n\n")
    assert time.process_time() - started < 2.0
    assert len(events) == 1 and len(events[0].data) == 3 << 20


def test_sse_decoder_refuses_a_line_past_the_cap() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: ok\n\ndata: ")
    with pytest.raises(UpstreamProtocolError, match="longer than"):
        for _ in range(MAX_LINE // 65536 + 1):
            decoder.feed(b"y" * 65536)


def test_sse_decoder_refuses_an_event_past_the_cap() -> None:
    decoder = SSEDecoder()
    with pytest.raises(UpstreamProtocolError, match="event larger than"):
        for _ in range(MAX_LINE // 65536 + 1):
            decoder.feed(b"data: " + b"z" * 65536 + b"\n")


@pytest.mark.parametrize("kind", ["fast", "aiohttp"])
@pytest.mark.parametrize("head", ["one long header", "many headers"])
def test_response_headers_past_the_cap_are_a_protocol_error(kind: str, head: str) -> None:
    from scripted import read_request, serving

    from tokenrelay.providers.http import UpstreamClient

    if head == "one long header":
        headers = b"x-big: " + b"a" * (8 << 20) + b"\r\n"
    else:
        headers = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 1000) for i in range(2000))

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + headers + b"content-length: 2\r\n\r\nok")
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def go() -> None:
        async with serving(upstream) as (url, _):
            client = UpstreamClient(pool_size=2, connect_timeout=5, read_timeout=5, spare_connection=False,
                                    client=kind)  # type: ignore[arg-type]
            try:
                started = time.process_time()
                with pytest.raises(UpstreamProtocolError, match="headers are larger than"):
                    await client.post_stream(url, b"{}", {"content-type": "application/json"})
                # refused at the cap, not after parsing all of it
                assert time.process_time() - started < 0.5
            finally:
                await client.aclose()

    asyncio.run(go())
