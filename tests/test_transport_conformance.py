"""Both upstream transports — the fast path (``http11``) and aiohttp — behave alike behind
``UpstreamClient``: each test here runs against each, with real scripted servers (and a
real forward proxy) on loopback. A difference between the two is a bug in one of them."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import re
import gzip
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from yarl import URL

from servers import RelayServer, SimServer, wait_until
from streams import chat, read_stream
from tokenrelay.config import SettingsError, load_settings
from tokenrelay.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable
from tokenrelay.providers.aiohttp_transport import AiohttpTransport
from tokenrelay.providers.http import AutoTransport, UpstreamClient, make_client
from tokenrelay.providers.http11 import Pool
from tokenrelay.providers.transport import TLSOptions

from scripted import (
    HEAD,
    Certificates,
    Handler,
    black_hole,
    chunked,
    forward_proxy,
    forward_proxy_in_thread,
    keep_alive_upstream,
    make_certificates,
    read_request,
    serving,
    until,
)

KINDS = ["fast", "aiohttp"]
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@contextlib.asynccontextmanager
async def client(kind: str, *, connect: float = 5.0, read: float = 5.0, pool_size: int = 4,
                 **options: Any) -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(pool_size=pool_size, connect_timeout=connect, read_timeout=read,
                              spare_connection=False, client=kind, **options)  # type: ignore[arg-type]
    try:
        yield upstream
    finally:
        await upstream.aclose()


async def post(upstream: UpstreamClient, url: URL, headers: dict[str, str] | None = None) -> tuple[dict[str, str], bytes]:
    response = await upstream.post_stream(url, b"{}", headers or {"content-type": "application/json"})
    try:
        return dict(response.headers), await response.read()
    finally:
        response.close()


def once(answer: bytes) -> Handler:
    """An upstream that reads one request and writes ``answer``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    return handler


def fetch_once(kind: str, answer: bytes, **options: Any) -> tuple[dict[str, str], bytes]:
    async def go() -> tuple[dict[str, str], bytes]:
        async with serving(once(answer)) as (url, _), client(kind, **options) as upstream:
            return await post(upstream, url)

    return asyncio.run(go())


def idle_connections(upstream: UpstreamClient) -> int:
    """Idle connections the client still takes for open (which transport it is matters only here)."""
    transport = upstream.transport
    if isinstance(transport, Pool):
        return sum(len(idle) for idle in transport._idle.values())
    assert isinstance(transport, AiohttpTransport) and transport._session is not None
    conns = transport._session.connector._conns  # type: ignore[union-attr]
    return sum(1 for kept in conns.values() for proto, _ in kept if proto.is_connected())


# --- bodies: framing, interim responses, encodings, headers ---

BODIES = {
    "chunked": (HEAD + chunked(b"data: 1\n\n") + chunked(b"data: 2\n\n") + b"0\r\n\r\n", b"data: 1\n\ndata: 2\n\n"),
    "chunk extensions and upper-case sizes": (
        HEAD + b"9;name=value\r\ndata: 1\n\n\r\n" + b"A\r\n0123456789\r\n0\r\n\r\n", b"data: 1\n\n0123456789"),
    "trailers": (HEAD + chunked(b"data: 1\n\n") + b"0\r\nx-usage: 3\r\nx-other: 4\r\n\r\n", b"data: 1\n\n"),
    "an empty chunked body": (HEAD + b"0\r\n\r\n", b""),
    "content-length": (b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\ndata: 1\n\n", b"data: 1\n\n"),
    "an empty content-length body": (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", b""),
    "a body that ends with the connection": (b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\ndata: 2\n\n", b"data: 1\n\ndata: 2\n\n"),
    "HTTP/1.0": (b"HTTP/1.0 200 OK\r\n\r\ndata: 1\n\n", b"data: 1\n\n"),
}


@pytest.mark.parametrize("case", list(BODIES))
def test_bodies_arrive_as_sent_however_framed(kind: str, case: str) -> None:
    answer, body = BODIES[case]
    assert fetch_once(kind, answer)[1] == body


def test_interim_responses_before_the_answer_are_skipped(kind: str) -> None:
    """"100 Continue" and "103 Early Hints" precede the answer on the same connection; the
    answer is the 200, with its own headers only."""
    interim = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n")
    headers, body = fetch_once(kind, interim + HEAD + chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
    assert body == b"data: [DONE]\n\n"
    assert "link" not in headers and headers["content-type"] == "text/event-stream"


def test_a_header_sent_twice_keeps_both_values(kind: str) -> None:
    answer = (b"HTTP/1.1 200 OK\r\nx-ratelimit: a=1\r\nX-RateLimit: b=2\r\nlink: <a>\r\ncontent-length: 2\r\n\r\nok")
    headers, _ = fetch_once(kind, answer)
    assert headers["x-ratelimit"] == "a=1, b=2"
    assert headers["link"] == "<a>"


def _streamed_gzip(pieces: list[bytes]) -> list[bytes]:
    """A gzip stream flushed after each piece, as a gateway compressing a stream sends it."""
    compressor = zlib.compressobj(wbits=zlib.MAX_WBITS | 16)
    out = [compressor.compress(piece) + compressor.flush(zlib.Z_SYNC_FLUSH) for piece in pieces]
    out[-1] += compressor.flush()
    return out


def test_a_gzip_stream_is_decoded_piece_by_piece(kind: str) -> None:
    """A gateway that compresses although tokenrelay asked for ``identity``: the body
    arrives decoded, each piece as soon as it was sent, and the headers no longer say gzip."""
    pieces = [b"data: %d\n\n" % i for i in range(3)]
    compressed = _streamed_gzip(pieces)
    taken = [asyncio.Event() for _ in pieces]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n"))
        for part, was_taken in zip(compressed, taken):
            writer.write(chunked(part))
            await writer.drain()
            await was_taken.wait()  # the next piece only once this one came out decoded
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def go() -> tuple[dict[str, str], list[bytes]]:
        async with serving(handler) as (url, _), client(kind) as upstream:
            response = await upstream.post_stream(url, b"{}", {})
            got: list[bytes] = []
            try:
                async for part in response:
                    got.append(part)
                    taken[min(len(got), len(taken)) - 1].set()
                return dict(response.headers), got
            finally:
                response.close()

    headers, got = asyncio.run(go())
    assert b"".join(got) == b"".join(pieces)
    assert len(got) == len(pieces)
    assert "content-encoding" not in headers


@pytest.mark.parametrize("encoding", ["gzip", "deflate (zlib)", "deflate (raw)"])
def test_a_compressed_whole_body_is_decoded(kind: str, encoding: str) -> None:
    body = orjson.dumps({"data": [{"id": "model-%d" % i} for i in range(50)]})
    if encoding == "gzip":
        encoded, name = gzip.compress(body), b"gzip"
    elif encoding == "deflate (zlib)":
        encoded, name = zlib.compress(body), b"deflate"
    else:
        raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        encoded, name = raw.compress(body) + raw.flush(), b"deflate"
    answer = b"HTTP/1.1 200 OK\r\ncontent-encoding: %s\r\ncontent-length: %d\r\n\r\n%s" % (name, len(encoded), encoded)
    headers, got = fetch_once(kind, answer)
    assert got == body
    assert "content-encoding" not in headers and "content-length" not in headers


def test_a_corrupt_gzip_body_is_a_lost_connection_not_garbage(kind: str) -> None:
    answer = HEAD.replace(b"\r\n\r\n", b"\r\ncontent-encoding: gzip\r\n\r\n") + chunked(b"not gzip at all") + b"0\r\n\r\n"
    with pytest.raises(UpstreamUnavailable, match="compressed body is corrupt"):
        fetch_once(kind, answer)


def test_an_encoding_tokenrelay_cannot_decode_passes_through_as_sent(kind: str) -> None:
    answer = b"HTTP/1.1 200 OK\r\ncontent-encoding: zstd\r\ncontent-length: 4\r\n\r\n\x28\xb5\x2f\xfd"
    headers, body = fetch_once(kind, answer)
    assert headers["content-encoding"] == "zstd" and body == b"\x28\xb5\x2f\xfd"


@pytest.mark.parametrize("name,value", [("x-ok\r\nx-injected", "1"), ("bad name", "1"), ("x-key", "a\r\nx-injected: 1"),
                                        ("x-key", "a\nb"), ("", "1")])
def test_a_header_that_would_break_the_request_is_refused_before_sending(kind: str, name: str, value: str) -> None:
    """A line break in a name or value (an API key pasted with its newline) would let it
    write headers of its own; it is refused with a message naming it, and nothing is sent."""

    async def go() -> int:
        async with serving(once(OK)) as (url, handled), client(kind) as upstream:
            with pytest.raises(UpstreamError, match="cannot send the request upstream: request header") as info:
                await upstream.post_stream(url, b"{}", {"content-type": "application/json", name: value})
            assert type(info.value) is UpstreamError
            return len(handled)

    assert asyncio.run(go()) == 0


# --- refusals and failures ---

def test_a_refusal_carries_the_upstreams_reason_and_retry_after(kind: str) -> None:
    body = orjson.dumps({"error": {"message": "Slow down, please"}})
    answer = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 7\r\n"
              b"content-length: %d\r\n\r\n%s" % (len(body), body))
    with pytest.raises(UpstreamRateLimited, match="upstream answered 429: Slow down, please") as info:
        fetch_once(kind, answer)
    assert info.value.headers == {"Retry-After": "7"}


def test_an_upstream_hanging_up_mid_answer_is_unavailable(kind: str) -> None:
    with pytest.raises(UpstreamUnavailable, match="lost mid-stream"):
        fetch_once(kind, HEAD + b"6\r\ndata: \r\n")


def test_bytes_that_are_not_http_are_unavailable(kind: str) -> None:
    with pytest.raises(UpstreamUnavailable, match="cannot reach upstream"):
        fetch_once(kind, b"SSH-2.0-OpenSSH_9.2\r\n\r\n")


def test_a_refused_connection_is_unavailable(kind: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def go() -> None:
        async with client(kind) as upstream:
            await post(upstream, URL(f"http://127.0.0.1:{port}/v1/chat/completions"))

    with pytest.raises(UpstreamUnavailable, match="cannot reach upstream"):
        asyncio.run(go())


# --- timeouts, one per phase ---

def test_connect_timeout(kind: str) -> None:
    async def go() -> None:
        with black_hole() as port:
            async with client(kind, connect=0.3, read=30) as upstream:
                await post(upstream, URL(f"http://127.0.0.1:{port}/v1/chat/completions"))

    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"cannot reach upstream: no connection to 127.0.0.1 port \d+ within 0.3 s"):
        asyncio.run(go())
    assert time.monotonic() - started < 5


def test_first_byte_timeout(kind: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the request, answers nothing

    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        asyncio.run(_fetch_from(handler, kind, read=0.3))


def test_timeout_between_pieces(kind: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(HEAD + chunked(b"data: 1\n\n"))
        await writer.drain()
        await reader.read()  # until the client gives up and closes

    with pytest.raises(UpstreamTimeout, match="went silent mid-stream"):
        asyncio.run(_fetch_from(handler, kind, read=0.3))


async def _fetch_from(handler: Handler, kind: str, **options: Any) -> bytes:
    async with serving(handler) as (url, _), client(kind, **options) as upstream:
        return (await post(upstream, url))[1]


def test_a_slow_reader_is_not_a_silent_upstream(kind: str) -> None:
    parts = [b"data: %d\n\n" % i for i in range(3)]
    answer = HEAD + b"".join(chunked(p) for p in parts) + b"0\r\n\r\n"

    async def go() -> bytes:
        async with serving(once(answer)) as (url, _), client(kind, read=0.2) as upstream:
            response = await upstream.post_stream(url, b"{}", {})
            got = []
            try:
                async for part in response:
                    got.append(part)
                    await asyncio.sleep(0.4)  # the relay's client holding it up, past the timeout
            finally:
                response.close()
            return b"".join(got)

    assert asyncio.run(go()) == b"".join(parts)


# --- connections: keep-alive, the reuse race, no POST sent twice, limits, idle ---

def test_a_connection_read_to_its_end_is_reused(kind: str) -> None:
    handler, requests_on = keep_alive_upstream()

    async def go() -> list[bytes]:
        async with serving(handler) as (url, _), client(kind) as upstream:
            return [(await post(upstream, url))[1] for _ in range(3)]

    assert asyncio.run(go()) == [b"ok"] * 3
    assert requests_on == [1, 1, 1]


def test_a_kept_connection_the_upstream_closed_is_passed_over(kind: str) -> None:
    """The upstream hangs up on an idle kept connection; the next POST, not yet written
    anywhere, goes out on a new connection."""
    handler, requests_on = keep_alive_upstream(close_after=1)

    async def go() -> list[bytes]:
        async with serving(handler) as (url, handled), client(kind) as upstream:
            first = (await post(upstream, url))[1]
            await asyncio.wait_for(handled[0], 5)
            await until(lambda: idle_connections(upstream) == 0)  # the client saw it close
            return [first, (await post(upstream, url))[1]]

    assert asyncio.run(go()) == [b"ok", b"ok"]
    assert requests_on == [1, 2]


def _drops_the_second_request() -> tuple[Handler, list[str]]:
    """Answers the first request on the first connection, then reads the second one and
    hangs up without a byte of answer — the upstream closing an idle connection just as a
    request arrives. Any later connection is answered. ``seen`` lists the methods received."""
    seen: list[str] = []
    accepted = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        first_connection = accepted == 1
        for answered in range(2):
            head = await read_request(reader)
            seen.append(head.split(b" ")[0].decode())
            if first_connection and answered == 1:
                return
            writer.write(OK)
            await writer.drain()

    return handler, seen


def test_a_post_is_never_sent_twice(kind: str) -> None:
    """A POST on a kept connection that dropped after the request went out, before any
    byte of answer: the upstream may have started the generation, so it is not sent again
    (that could run, and bill, it twice). The caller gets the error instead."""
    handler, seen = _drops_the_second_request()

    async def go() -> None:
        async with serving(handler) as (url, _), client(kind) as upstream:
            await post(upstream, url)
            with pytest.raises(UpstreamUnavailable, match="before it answered") as caught:
                await post(upstream, url)
            assert caught.value.request_sent  # so the router does not try it again either

    asyncio.run(go())
    assert seen == ["POST", "POST"]


def test_a_get_is_sent_again_on_a_new_connection(kind: str) -> None:
    handler, seen = _drops_the_second_request()

    async def go() -> list[tuple[int, bytes]]:
        async with serving(handler) as (url, _), client(kind) as upstream:
            return [await upstream.get(url, {}, timeout=5) for _ in range(2)]

    assert asyncio.run(go()) == [(200, b"ok"), (200, b"ok")]
    assert seen == ["GET", "GET", "GET"]


def test_the_pool_limit_holds_requests_until_a_connection_is_free(kind: str) -> None:
    in_flight = 0
    most_in_flight = 0
    finish = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most_in_flight
        while True:
            await read_request(reader)
            in_flight += 1
            most_in_flight = max(most_in_flight, in_flight)
            writer.write(HEAD + chunked(b"data: 1\n\n"))
            await writer.drain()
            await finish.wait()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            in_flight -= 1

    async def go() -> list[bytes]:
        async with serving(handler) as (url, _), client(kind, pool_size=1) as upstream:
            first = await upstream.post_stream(url, b"{}", {})
            second = asyncio.create_task(upstream.post_stream(url, b"{}", {}))
            done, _ = await asyncio.wait({second}, timeout=0.3)  # a window for a wrong second request
            assert not done, "a second request went out past a pool of one"
            finish.set()
            bodies = [await first.read()]
            first.close()
            response = await asyncio.wait_for(second, 5)
            bodies.append(await response.read())
            response.close()
            return bodies

    assert asyncio.run(go()) == [b"data: 1\n\n"] * 2
    assert most_in_flight == 1


def test_idle_connections_are_closed(kind: str) -> None:
    closed_after: list[float] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        answered = time.monotonic()
        assert await reader.read() == b""  # the client's close
        closed_after.append(time.monotonic() - answered)

    async def go() -> None:
        async with serving(handler) as (url, handled), client(kind, idle_keep=0.3) as upstream:
            await post(upstream, url)
            await asyncio.wait_for(handled[0], 5)

    asyncio.run(go())
    assert 0.2 < closed_after[0] < 3


# --- addresses: IPv6, Happy Eyeballs ---

def test_an_ipv6_upstream_gets_a_bracketed_host(kind: str) -> None:
    hosts: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request(reader)
        hosts.append(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"host:")))
        writer.write(OK)
        await writer.drain()

    async def go() -> tuple[URL, bytes]:
        async with serving(handler, host="::1") as (url, _), client(kind) as upstream:
            return url, (await post(upstream, url))[1]

    url, body = asyncio.run(go())
    assert body == b"ok"
    assert hosts[0].split(b":", 1)[1].strip() == f"[::1]:{url.port}".encode()


def test_an_address_that_swallows_packets_costs_a_quarter_second_not_the_connect_timeout(kind: str) -> None:
    """Happy Eyeballs (RFC 8305): a name with an IPv6 address that never answers and an
    IPv4 one that does is reached over IPv4 after 0.25 s. The machine's resolver knows no
    such name, so the event loop's lookup answers for it; the connections are real."""

    async def go() -> tuple[bytes, float]:
        with black_hole("::1") as hole:
            async with serving(once(OK)) as (url, _):
                loop = asyncio.get_running_loop()
                real = loop.getaddrinfo

                async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
                    if host != "dual-stack.test":
                        return await real(host, port, *args, **kwargs)
                    return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", hole, 0, 0)),
                            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", url.port))]

                loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]
                async with client(kind, connect=10) as upstream:
                    started = time.monotonic()
                    body = (await post(upstream, url.with_host("dual-stack.test")))[1]
                    return body, time.monotonic() - started

    body, took = asyncio.run(go())
    assert body == b"ok"
    assert took < 3, f"took {took:.2f} s"


# --- TLS options ---

def _tls_upstream(certs: Certificates, *, require_client: bool = False) -> Callable[[], Any]:
    return lambda: serving(once(HEAD + chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"),
                           ssl_context=certs.server_context(require_client=require_client))


def test_a_ca_bundle_is_trusted_and_nothing_else(kind: str, certs: Certificates) -> None:
    async def go(tls: TLSOptions | None) -> bytes:
        async with _tls_upstream(certs)() as (url, _), client(kind, tls=tls) as upstream:
            return (await post(upstream, url))[1]

    with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(go(None))
    assert asyncio.run(go(TLSOptions(ca_bundle=str(certs.server_cert)))) == b"data: [DONE]\n\n"


def test_a_client_certificate_is_presented(kind: str, certs: Certificates) -> None:
    async def go(client_cert: Path | None) -> bytes:
        tls = TLSOptions(ca_bundle=str(certs.server_cert), client_cert=str(client_cert) if client_cert else None)
        async with _tls_upstream(certs, require_client=True)() as (url, _), client(kind, tls=tls) as upstream:
            return (await post(upstream, url))[1]

    assert asyncio.run(go(certs.client)) == b"data: [DONE]\n\n"
    with pytest.raises(UpstreamUnavailable):
        asyncio.run(go(None))


# --- proxies from the environment ---

@pytest.mark.parametrize("setting", ["auto", "aiohttp"])
def test_an_http_upstream_goes_through_http_proxy(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> tuple[bytes, list[str], URL]:
        async with forward_proxy() as proxy, serving(once(OK)) as (url, _):
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            async with client(setting) as upstream:
                return (await post(upstream, url))[1], proxy.seen, url

    body, seen, url = asyncio.run(go())
    assert body == b"ok"
    assert seen == [f"POST {url}"]


@pytest.mark.parametrize("setting", ["auto", "aiohttp"])
def test_an_https_upstream_is_tunnelled_through_https_proxy(setting: str, certs: Certificates,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> tuple[bytes, list[str], URL]:
        async with forward_proxy() as proxy, _tls_upstream(certs)() as (url, _):
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            async with client(setting, tls=TLSOptions(ca_bundle=str(certs.server_cert))) as upstream:
                return (await post(upstream, url))[1], proxy.seen, url

    body, seen, url = asyncio.run(go())
    assert body == b"data: [DONE]\n\n"
    assert seen == [f"CONNECT localhost:{url.port}"]


def test_the_proxy_urls_credentials_are_sent_to_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> list[str]:
        async with forward_proxy() as proxy, serving(once(OK)) as (url, _):
            monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://relay:s3cret@"))
            async with client("auto") as upstream:
                await post(upstream, url, {"authorization": "Bearer sk-upstream"})
            return proxy.credentials

    assert asyncio.run(go()) == ["Basic " + base64.b64encode(b"relay:s3cret").decode()]


def test_no_proxy_sends_an_upstream_directly_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    async def go() -> tuple[bytes, list[str], str]:
        async with forward_proxy() as proxy, serving(once(OK)) as (url, _):
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
            async with client("auto") as upstream:
                assert isinstance(upstream.transport, AutoTransport)
                return (await post(upstream, url))[1], proxy.seen, upstream.transport.for_url(url).name

    assert asyncio.run(go()) == (b"ok", [], "fast")


def test_the_fast_client_when_forced_goes_direct_and_says_the_proxy_is_ignored(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> tuple[bytes, list[str]]:
        async with forward_proxy() as proxy, serving(once(OK)) as (url, _):
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            async with client("fast") as upstream:
                return (await post(upstream, url))[1], proxy.seen

    assert asyncio.run(go()) == (b"ok", [])
    assert "proxy settings in the environment (HTTPS_PROXY, HTTP_PROXY) are not used" in caplog.text


def test_without_a_proxy_auto_is_the_fast_path() -> None:
    async def go() -> str:
        async with client("auto") as upstream:
            return upstream.transport.name

    assert asyncio.run(go()) == "fast"


@pytest.mark.parametrize("setting", ["auto", "aiohttp"])
def test_an_unreachable_proxy_says_so(setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")

    async def go() -> None:
        async with client(setting) as upstream:
            await post(upstream, URL("http://upstream.test/v1/chat/completions"))

    with pytest.raises(UpstreamUnavailable, match=f"cannot reach upstream: .*127.0.0.1:{port}"):
        asyncio.run(go())


def test_a_relay_behind_an_egress_proxy_reaches_its_upstream(sim_server: SimServer,
                                                             start_relay: Callable[..., RelayServer]) -> None:
    """A network whose only way out is a proxy: the model API's name resolves only there.
    ``tokenrelay serve`` with HTTP_PROXY set streams through it; told to use the fast
    client only, it cannot reach the upstream, and says so."""
    port = URL(sim_server.url).port
    upstream = f"http://model-api.internal:{port}/v1"
    ask = chat(model="sim:ttft=0,tps=0,tokens=5")
    with forward_proxy_in_thread({"model-api.internal": "127.0.0.1"}) as proxy:
        relay = start_relay(upstream=upstream, HTTP_PROXY=proxy.url, NO_PROXY="")
        result = read_stream(relay.url, ask)
        assert (result.status, result.error) == (200, None) and result.body
        # The relay's first request to the upstream (the answer, or the model list the metrics
        # ask for at start-up) opened the proxied connection; the test proxy records the first
        # request of each connection only. The name resolves nowhere but at the proxy, so the
        # answer above came through it.
        assert any(line.split(" ")[1].startswith(upstream) for line in proxy.seen), proxy.seen

        fast_only = start_relay(upstream=upstream, HTTP_PROXY=proxy.url, NO_PROXY="", TOKENRELAY_UPSTREAM_CLIENT="fast")
        refused = read_stream(fast_only.url, ask)
        assert refused.status == 502
        assert b"cannot reach upstream" in refused.body


@pytest.fixture(scope="module")
def aiohttp_relay(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> RelayServer:
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_UPSTREAM_CLIENT="aiohttp")


_VOLATILE = re.compile(rb'"id":"[^"]*","object":"chat\.completion(\.chunk)?","created":\d+')


def test_a_relay_on_aiohttp_passes_v1_bytes_through(aiohttp_relay: RelayServer, sim_server: SimServer) -> None:
    """The whole relay on the maintained client: ``/v1`` streams and whole answers arrive as
    the upstream sent them, as they do on the fast path (tests/test_v1_wire.py)."""
    with httpx.Client(timeout=30) as http:
        for stream in (True, False):
            body = chat("pass me through", model="sim:ttft=0,tps=0,tokens=30", stream=stream)
            direct = http.post(sim_server.url + "/v1/chat/completions", json=body)
            relayed = http.post(aiohttp_relay.url + "/v1/chat/completions", json=body)
            assert relayed.status_code == 200
            # A stream's chunks gain their id lines, for a resume (docs/resume.md); nothing else changes.
            relayed_bytes = re.sub(rb"^id: \d+\n", b"", relayed.content, flags=re.MULTILINE)
            assert _VOLATILE.sub(b"", relayed_bytes) == _VOLATILE.sub(b"", direct.content)
    result = read_stream(aiohttp_relay.url, chat(model="sim:ttft=0,tps=0,tokens=30"))
    assert (result.status, result.error) == (200, None) and result.body


def test_a_relay_on_aiohttp_stops_the_upstream_when_its_client_leaves(aiohttp_relay: RelayServer,
                                                                     sim_server: SimServer) -> None:
    """Closing an unfinished aiohttp response closes its connection, which is how the
    upstream learns to stop generating (tests/test_cancel.py, on the fast path)."""
    sim_server.wait_idle()
    cancelled = sim_server.stats()["cancelled_streams"]
    payload = orjson.dumps(chat(model="sim:ttft=0,tps=10,tokens=200"))
    with socket.create_connection(("127.0.0.1", aiohttp_relay.port)) as sock:
        sock.sendall(b"POST /api/get-response HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"X-Resume-Grace: 0\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    left = time.monotonic()
    wait_until(lambda: sim_server.stats()["cancelled_streams"] > cancelled, timeout=5, interval=0.01)
    assert time.monotonic() - left < 1.0
    sim_server.wait_idle()


# --- the settings ---

def test_the_setting_picks_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_CLIENT", "aiohttp")
    assert make_client(load_settings()).transport.name == "aiohttp"
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_CLIENT", "turbo")
    with pytest.raises(SettingsError, match="TOKENRELAY_UPSTREAM_CLIENT"):
        load_settings()


def test_tls_files_are_checked_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_CA_BUNDLE", str(tmp_path / "missing.pem"))
    with pytest.raises(SettingsError, match="TOKENRELAY_UPSTREAM_CA_BUNDLE"):
        load_settings()
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_CA_BUNDLE", str(not_pem))
    with pytest.raises(SettingsError, match="TOKENRELAY_UPSTREAM_CA_BUNDLE.*cannot load"):
        load_settings()
    monkeypatch.delenv("TOKENRELAY_UPSTREAM_CA_BUNDLE")
    monkeypatch.setenv("TOKENRELAY_UPSTREAM_CLIENT_CERT", str(not_pem))  # no key in it either
    with pytest.raises(SettingsError, match="TOKENRELAY_UPSTREAM_CLIENT_CERT.*cannot load"):
        load_settings()


# --- a request that may have reached the upstream is never sent again ---

@pytest.mark.parametrize("kind", KINDS)
def test_router_does_not_resend_a_request_the_upstream_took_and_dropped(kind: str) -> None:
    """An upstream that reads the request, then closes without a byte of answer, may have
    started (and billed) a generation: the router's retries must not run it again, though
    it retries a refused connection (the next test's contrast)."""
    from tokenrelay.config import load_settings
    from tokenrelay.errors import UpstreamUnavailable
    from tokenrelay.routing import Attempts, ModelRouter, Router
    from tokenrelay.schemas import ChatRequest

    received: list[bytes] = []

    async def take_and_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_request(reader))

    async def go() -> tuple[Exception, str]:
        async with serving(take_and_drop) as (url, _):
            base = str(url).removesuffix("/chat/completions")
            settings = load_settings(None, upstream_url=base, upstream_client=kind, retries=3, retry_backoff=0.01)
            provider = ModelRouter(Router(settings))
            attempts = Attempts()
            try:
                await provider.open(ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]}),
                                    model="m", attempts=attempts)
            except UpstreamUnavailable as exc:
                return exc, str(attempts)
            finally:
                await provider.aclose()
            raise AssertionError("the dropped request was answered")

    error, attempts = asyncio.run(go())
    assert len(received) == 1, f"the request was sent {len(received)} times"
    assert error.request_sent and attempts.count(",") == 0, attempts


@pytest.mark.parametrize("kind", KINDS)
def test_router_retries_a_connection_that_was_refused(kind: str) -> None:
    from tokenrelay.config import load_settings
    from tokenrelay.errors import UpstreamUnavailable
    from tokenrelay.routing import Attempts, ModelRouter, Router
    from tokenrelay.schemas import ChatRequest

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, never listening: connections are refused

        async def go() -> str:
            settings = load_settings(None, upstream_url=f"http://127.0.0.1:{port}/v1", upstream_client=kind,
                                     retries=2, retry_backoff=0.01)
            provider = ModelRouter(Router(settings))
            attempts = Attempts()
            try:
                await provider.open(ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]}),
                                    model="m", attempts=attempts)
            except UpstreamUnavailable:
                return str(attempts)
            finally:
                await provider.aclose()
            raise AssertionError("a refused connection answered")

        assert asyncio.run(go()).count(",") == 2  # three tries
