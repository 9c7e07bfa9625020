"""The upstream client reports each way an upstream can fail as its own error — unreachable,
refused with a reason, hung up mid-answer, gone silent — so the relay gives each its own
status and message. The upstreams here are scripted HTTP servers on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest
from yarl import URL

from tokenrelay.errors import UpstreamError, UpstreamRateLimited, UpstreamTimeout, UpstreamUnavailable
from tokenrelay.providers.http import UpstreamClient

from scripted import HEAD, Handler, chunked, keep_alive_upstream, read_request, serving, until


async def fetch(url: str, *, read: float = 5.0, consume: Callable[[bytes], Awaitable[None]] | None = None) -> bytes:
    client = UpstreamClient(pool_size=4, connect_timeout=5.0, read_timeout=read, spare_connection=False)
    try:
        response = await client.post_stream(URL(url), b"{}", {"content-type": "application/json"})
        parts = []
        try:
            async for part in response:
                parts.append(part)
                if consume is not None:
                    await consume(part)
        finally:
            response.close()
        return b"".join(parts)
    finally:
        await client.aclose()


async def with_server(handler: Handler, **kwargs) -> bytes:
    """Serve ``handler`` and fetch from it once."""
    async with serving(handler) as (url, _):
        return await fetch(str(url), **kwargs)


@contextlib.asynccontextmanager
async def client_of(handler: Handler, *, spare: bool = False
                    ) -> AsyncIterator[tuple[UpstreamClient, URL, list[asyncio.Task[None]]]]:
    """An ``UpstreamClient`` and the scripted upstream it talks to; ``handled`` holds a task
    per connection the upstream accepted. Without a spare connection unless asked, so the
    connections a test counts are the ones its requests opened."""
    async with serving(handler) as (url, handled):
        client = UpstreamClient(pool_size=4, connect_timeout=5.0, read_timeout=5.0, spare_connection=spare)
        try:
            yield client, url, handled
        finally:
            await client.aclose()


def test_refused_connection_is_unavailable_not_a_timeout() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamUnavailable, match="cannot reach upstream"):
        asyncio.run(fetch(f"http://127.0.0.1:{port}/v1/chat/completions"))


def test_refusal_carries_the_upstreams_reason_and_retry_after() -> None:
    body = orjson.dumps({"error": {"message": "Slow down, please"}})

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 7\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    with pytest.raises(UpstreamRateLimited, match="upstream answered 429: Slow down, please") as info:
        asyncio.run(with_server(handler))
    assert info.value.headers == {"Retry-After": "7"}


def test_refusal_without_a_json_body_names_the_status() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    with pytest.raises(UpstreamError, match="upstream answered 503: Service Unavailable") as info:
        asyncio.run(with_server(handler))
    assert info.value.status == 502


def test_upstream_hanging_up_mid_answer_is_unavailable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"6\r\ndata: \r\n")
        await writer.drain()

    with pytest.raises(UpstreamUnavailable, match="lost mid-stream"):
        asyncio.run(with_server(handler))


def test_silent_upstream_is_a_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + chunked(b"data: 1\n\n"))
        await writer.drain()
        await reader.read()  # until the client gives up and closes

    with pytest.raises(UpstreamTimeout, match="went silent"):
        asyncio.run(with_server(handler, read=0.3))


def test_upstream_that_never_answers_is_a_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # reads the request, answers nothing

    with pytest.raises(UpstreamTimeout, match="did not answer in time"):
        asyncio.run(with_server(handler, read=0.3))


def test_a_slow_reader_is_not_a_silent_upstream() -> None:
    """Only time spent waiting for the upstream counts as silence: a relay held up by its
    client for longer than the timeout reads on when it comes back."""
    parts = [b"data: %d\n\n" % i for i in range(3)]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"".join(chunked(p) for p in parts) + b"0\r\n\r\n")
        await writer.drain()

    async def slow(_: bytes) -> None:
        await asyncio.sleep(0.5)  # the held-up client, longer than the 0.2 s timeout

    assert asyncio.run(with_server(handler, read=0.2, consume=slow)) == b"".join(parts)


def test_a_whole_answer_arrives_unchanged() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(HEAD + b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        await writer.drain()

    assert asyncio.run(with_server(handler)) == b"data: [DONE]\n\n"


def test_a_fast_upstream_lets_the_event_loop_run_between_any_two_pieces() -> None:
    """The relay's ``send`` does not suspend, so this is what keeps one fast stream from
    holding every other stream (and its own disconnect listener) until it ends."""
    events = [b"data: %d %s\n\n" % (i, b"x" * 1000) for i in range(3000)]  # 3 MB: many network reads

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for start in range(0, len(events), 100):  # as fast as the socket takes them
            writer.write((HEAD if start == 0 else b"") + b"".join(chunked(e) for e in events[start:start + 100]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    turns = 0
    turns_at_pieces: list[int] = []

    async def main() -> bytes:
        async def ticker() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        async def consume(part: bytes) -> None:  # takes the piece without suspending
            turns_at_pieces.append(turns)

        task = asyncio.create_task(ticker())
        try:
            return await with_server(handler, consume=consume)
        finally:
            task.cancel()

    assert asyncio.run(main()) == b"".join(events)
    assert len(turns_at_pieces) > 1
    assert all(later > earlier for earlier, later in zip(turns_at_pieces, turns_at_pieces[1:]))


def test_a_connection_is_kept_for_the_next_request_and_replaced_when_the_upstream_closed_it() -> None:
    """Answers read to their end leave their connection for the next request; a kept
    connection the upstream closed meanwhile is replaced without the caller noticing."""
    connections = 0
    close_after_answer = False

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            if close_after_answer:
                break

    async def go() -> list[bytes]:
        nonlocal close_after_answer
        bodies = []
        async with client_of(handler) as (client, url, _):
            for i in range(4):
                if i == 2:
                    close_after_answer = True  # the upstream now hangs up after each answer
                response = await client.post_stream(url, b"{}", {})
                bodies.append(await response.read())
                response.close()
                if i == 2:
                    # the pooled connection is closed by the upstream before the next request
                    await until(lambda: response._conn.closed)
        return bodies

    assert asyncio.run(go()) == [b"ok"] * 4
    assert connections == 2  # requests 1-3 on the first connection, 4 on a new one


def test_an_answer_left_unread_after_it_arrived_whole_keeps_a_connection_that_reads_again() -> None:
    """A relay's client that leaves once the upstream has finished, but before the answer
    was relayed, leaves it unread. The connection is kept, and reading had paused for the
    unread bytes: the next request on it must still get its answer."""
    # Past the read pause by a little, so the bytes that cross it end the answer too.
    big = chunked(b"data: " + b"x" * (64 * 1024 + 100) + b"\n\n") + b"0\r\n\r\n"
    done = chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # the answer in one write
        for answer in (big, done):  # two requests, one connection
            await read_request(reader)
            writer.write(HEAD + answer)
            await writer.drain()

    async def main() -> tuple[bytes, int]:
        async with client_of(handler) as (client, url, handled):
            first = await client.post_stream(url, b"{}", {"content-type": "application/json"})
            await until(lambda: first.complete)
            first.close()  # unread
            async with asyncio.timeout(5):
                second = await client.post_stream(url, b"{}", {"content-type": "application/json"})
                try:
                    return await second.read(), len(handled)
                finally:
                    second.close()

    # One connection: the second request came on the kept one.
    assert asyncio.run(main()) == (b"data: [DONE]\n\n", 1)


def test_a_kept_connection_dropped_as_a_get_arrives_is_retried_once_on_a_new_one() -> None:
    """The race every keep-alive client meets: the upstream closes an idle connection just
    as the next request is sent on it. No byte of answer came back, so a GET goes again on
    a new connection, and the caller sees only the answer. (A POST is not sent again:
    tests/test_transport_conformance.py.)"""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first_connection = connections == 1
        for answered in range(2):
            await reader.readuntil(b"\r\n\r\n")
            if first_connection and answered == 1:
                return  # the second request on the kept connection: hang up, unanswered
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()

    async def go() -> list[tuple[int, bytes]]:
        async with client_of(handler) as (client, url, _):
            return [await client.get(url, {}, timeout=5) for _ in range(2)]

    assert asyncio.run(go()) == [(200, b"ok"), (200, b"ok")]
    assert connections == 2


def test_a_request_that_takes_the_last_idle_connection_has_a_spare_opened_for_the_next() -> None:
    """With every connection busy, a new stream would first wait for a TCP (and TLS)
    handshake. The pool keeps one spare ready: the second of two overlapping requests goes
    out on a connection the upstream accepted before that request began, and taking it
    readies the next spare."""
    handler, requests_on = keep_alive_upstream()

    async def go() -> list[bytes]:
        async with client_of(handler, spare=True) as (client, url, handled):
            first = await client.post_stream(url, b"{}", {})  # opens connection 1, then a spare
            await until(lambda: len(handled) == 2)
            second = await client.post_stream(url, b"{}", {})  # the first still holds its connection
            await until(lambda: len(handled) == 3)  # the next spare
            try:
                return [await first.read(), await second.read()]
            finally:
                first.close()
                second.close()

    assert asyncio.run(go()) == [b"ok", b"ok"]
    assert requests_on == [1, 2]


def test_without_a_spare_connection_each_busy_moment_opens_its_own() -> None:
    """``TOKENRELAY_SPARE_CONNECTION=false``: connections are opened only by the requests
    that need them, and kept ones are reused."""
    handler, requests_on = keep_alive_upstream()

    async def go() -> int:
        async with client_of(handler, spare=False) as (client, url, handled):
            first = await client.post_stream(url, b"{}", {})
            second = await client.post_stream(url, b"{}", {})  # overlapping: a second connection
            for response in (first, second):
                await response.read()
                response.close()
            third = await client.post_stream(url, b"{}", {})  # on a kept one
            await third.read()
            third.close()
            return len(handled)

    assert asyncio.run(go()) == 2
    assert requests_on == [1, 2, 2]


@pytest.mark.parametrize("when", ["with the answer", "while idle"])
def test_a_connection_that_sent_bytes_nobody_asked_for_is_not_reused(when: str) -> None:
    """Some servers write to a connection unasked before they close it (a "408 Request
    Timeout"), right after an answer or while it sits idle. Those bytes must not be taken
    for the next request's answer: the next request goes on a new connection."""
    stray = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\r\n"
    kept = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" + (stray if when == "with the answer" else b""))
        if when == "while idle":
            await kept.wait()
            writer.write(stray)
        await writer.drain()
        await read_request(reader)  # a request sent on it anyway is never answered

    async def go() -> list[tuple[int, bytes]]:
        answers = []
        async with client_of(handler) as (client, url, handled):
            for _ in range(2):
                response = await client.post_stream(url, b"{}", {})
                answers.append((response._conn.status, await response.read()))
                conn = response._conn
                response.close()
                kept.set()
                if len(answers) == 1 and when == "while idle":
                    await until(lambda: conn.received)  # the stray bytes have arrived
            assert len(handled) == 2
        return answers

    assert asyncio.run(go()) == [(200, b"ok"), (200, b"ok")]


def test_a_body_that_ends_with_the_connection_is_whole() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n")
        await writer.drain()

    assert asyncio.run(with_server(handler)) == b"data: 1\n\ndata: 2\n\n"


def test_an_unread_answer_stops_the_upstream_from_writing() -> None:
    """A reader that stops reading stops the upstream too (through TCP), so an answer is
    never buffered whole: what the upstream got written stays far below the answer."""
    piece = b"x" * 16384
    total = 2000  # 33 MB; socket buffers on loopback hold a few MB of it
    written = 0

    handled: list[asyncio.Task[None]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        handled.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(piece) * total))
            for _ in range(total):
                writer.write(piece)
                await writer.drain()
                written += 1
        finally:
            writer.close()
            await writer.wait_closed()

    async def go() -> tuple[int, int]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        client = UpstreamClient(pool_size=4, connect_timeout=5.0, read_timeout=30.0, spare_connection=False)
        try:
            response = await client.post_stream(url, b"{}", {})
            # Not reading: wait until the upstream's writes stop getting through.
            last, stable_since = -1, asyncio.get_running_loop().time()
            async with asyncio.timeout(10):
                while asyncio.get_running_loop().time() - stable_since < 0.3:
                    if written != last:
                        last, stable_since = written, asyncio.get_running_loop().time()
                    await asyncio.sleep(0.02)
            held_back_at = written
            received = sum([len(chunk) async for chunk in response])
            response.close()
            return held_back_at, received
        finally:
            await client.aclose()
            server.close()
            await asyncio.wait_for(asyncio.gather(*handled, return_exceptions=True), 5)

    held_back_at, received = asyncio.run(go())
    assert held_back_at < total // 2, f"the upstream wrote {held_back_at} of {total} pieces to a reader that read none"
    assert received == len(piece) * total


def test_an_https_upstream_is_verified_and_read(tmp_path, monkeypatch) -> None:
    """TLS with the system's verification: the upstream's certificate must be trusted
    (here one made for the test, named in SSL_CERT_FILE), and the answer arrives as sent."""
    import shutil
    import ssl
    import subprocess

    openssl = shutil.which("openssl")
    assert openssl is not None, "openssl is needed to make the test's certificate"
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ssl.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(HEAD + chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            await writer.drain()
        except (ssl.SSLError, asyncio.IncompleteReadError):
            pass  # the client refused the certificate
        finally:
            writer.close()

    async def fetch_tls() -> bytes:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ssl)
        port = server.sockets[0].getsockname()[1]
        try:
            return await fetch(f"https://localhost:{port}/v1/chat/completions")
        finally:
            server.close()

    # Not trusted: refused as unreachable, with the reason.
    with pytest.raises(UpstreamUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(fetch_tls())
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    assert asyncio.run(fetch_tls()) == b"data: [DONE]\n\n"


def test_an_upstream_that_stops_taking_the_request_is_a_timeout() -> None:
    """The fast client's write timeout: an upstream that accepts the connection but reads
    none of a large request fails it after ``connect_timeout`` seconds of not taking bytes,
    not after the (much longer) wait for the first byte of answer."""
    finished = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await finished.wait()  # reads nothing

    async def go() -> float:
        async with serving(handler) as (url, _):
            client = UpstreamClient(pool_size=4, connect_timeout=0.3, read_timeout=30.0, spare_connection=False)
            started = asyncio.get_running_loop().time()
            try:
                with pytest.raises(UpstreamTimeout, match="upstream did not take the request"):
                    await client.post_stream(url, b"x" * (64 << 20), {})
                return asyncio.get_running_loop().time() - started
            finally:
                finished.set()
                await client.aclose()

    assert asyncio.run(go()) < 10
