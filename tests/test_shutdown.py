"""A relay that shuts down while it streams: the answers it had to cut are logged and counted
as cut by the shutdown, never as completed."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx

from servers import RelayServer
from streams import chat


def test_a_stream_cut_by_shutdown_is_not_logged_as_completed(start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=None)
    with httpx.Client(timeout=30) as client, client.stream(
            "POST", relay.url + "/api/get-response", json=chat("hi", model="sim:ttft=0,tps=20,tokens=2000"),
            headers={"accept": "text/event-stream", "x-resume-grace": "0"}) as response:
        stream_id = response.headers["x-stream-id"]
        chunks = response.iter_bytes()
        next(chunks)  # the answer is under way
        relay.stop()  # SIGTERM: the server waits for its connections, then cancels them
        try:
            for _ in chunks:
                pass
        except httpx.HTTPError:
            pass  # cut off, as it should be
    [line] = [line for line in relay.log().splitlines() if stream_id in line and "outcome=" in line]
    assert re.search(r"outcome=shutdown\b", line), line
