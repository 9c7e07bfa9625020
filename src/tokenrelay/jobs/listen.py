"""``tokenrelay webhooks listen``: a local webhook receiver for people integrating jobs.

It verifies each delivery's Standard Webhooks signature, answers 204 (or 401 for a bad
signature), tells retries from duplicates by ``webhook-id`` (a retry follows a refused or
failed attempt; a duplicate arrives after one was accepted, and is answered 204 again but not
counted twice), and hands each delivery to a callback: the CLI prints it, the tests
record it. ``fail_first`` answers 500 to the first N attempts, to watch retries happen.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


@dataclass(frozen=True, slots=True)
class Delivery:
    webhook_id: str
    attempt: int
    """How many requests with this webhook id arrived, this one included."""
    verified: bool
    status: int
    """What the receiver answered."""
    payload: Any
    headers: dict[str, str]
    body: bytes
    received: float
    answered_before: bool = False
    """Whether an earlier request with this webhook id was answered 2xx."""

    @property
    def duplicate(self) -> bool:
        """The same webhook again after it was accepted: the receiver must not act twice."""
        return self.attempt > 1 and self.answered_before

    @property
    def retry(self) -> bool:
        """The same webhook again after an earlier attempt was refused or failed."""
        return self.attempt > 1 and not self.answered_before


class Receiver:
    """The receiving side's state; thread-safe, so tests can read it while it serves."""

    def __init__(self, secret: str | None, *, fail_first: int = 0,
                 on_delivery: Callable[[Delivery], Any] | None = None) -> None:
        self.webhook = Webhook(secret) if secret else None
        self.fail_first = fail_first
        self.on_delivery = on_delivery
        self.deliveries: list[Delivery] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def unique(self) -> dict[str, Delivery]:
        """The first successful delivery of each webhook id."""
        with self._lock:
            firsts: dict[str, Delivery] = {}
            for d in self.deliveries:
                if 200 <= d.status < 300:
                    firsts.setdefault(d.webhook_id, d)
            return firsts

    def attempts(self, webhook_id: str) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if d.webhook_id == webhook_id]

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        webhook_id = headers.get("webhook-id", "")
        verified = False
        payload: Any = None
        if self.webhook is not None:
            try:
                payload = self.webhook.verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        else:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
        with self._lock:
            self._seen[webhook_id] = attempt = self._seen.get(webhook_id, 0) + 1
            answered_before = any(d.webhook_id == webhook_id and 200 <= d.status < 300 for d in self.deliveries)
            total = len(self.deliveries) + 1
            if self.webhook is not None and not verified:
                status = 401
            elif total <= self.fail_first:
                status = 500
            else:
                status = 204
            delivery = Delivery(webhook_id, attempt, verified, status, payload, headers, body, time.time(),
                                answered_before)
            self.deliveries.append(delivery)
        if self.on_delivery is not None:
            self.on_delivery(delivery)
        if status == 401:
            return JSONResponse({"error": "signature does not verify"}, status_code=401)
        return Response(status_code=status)


def create_listen_app(receiver: Receiver) -> Starlette:
    async def status(request: Request) -> Response:
        return JSONResponse({"deliveries": len(receiver.deliveries), "webhook_ids": len(receiver._seen),
                             "verifying": receiver.webhook is not None})

    return Starlette(routes=[Route("/{path:path}", receiver.handle, methods=["POST"]),
                             Route("/{path:path}", status, methods=["GET"])])
