"""A real webhook receiver on loopback for the tests: ``tokenrelay webhooks listen``'s own
app (``jobs.listen``) served by uvicorn in a thread, recording every delivery."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from servers import free_port, wait_until

from tokenrelay.jobs.listen import Receiver, create_listen_app

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@contextmanager
def running_receiver(secret: str | None = SECRET, *, fail_first: int = 0,
                     receiver: Receiver | None = None) -> Iterator[tuple[str, Receiver]]:
    """A receiver on a free port: its URL and its record of deliveries."""
    receiver = receiver or Receiver(secret, fail_first=fail_first)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_listen_app(receiver), host="127.0.0.1", port=port,
                                           log_config=None, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, timeout=10)
    try:
        yield f"http://127.0.0.1:{port}/hooks", receiver
    finally:
        server.should_exit = True
        thread.join(10)
