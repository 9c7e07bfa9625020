"""A real webhook receiver on loopback for the tests: ``tokenrelay webhooks listen``'s own
app (``jobs.listen``) served by uvicorn in a thread, recording every delivery."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from servers import free_port, wait_until

from tokenrelay.jobs.listen import Receiver, create_listen_app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Any ASGI app on a free loopback port, in a thread: its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def running_receiver(secret: str | None = SECRET, *, fail_first: int = 0,
                     receiver: Receiver | None = None) -> Iterator[tuple[str, Receiver]]:
    """A receiver on a free port: its URL and its record of deliveries."""
    receiver = receiver or Receiver(secret, fail_first=fail_first)
    with serving(create_listen_app(receiver)) as url:
        yield url + "/hooks", receiver
