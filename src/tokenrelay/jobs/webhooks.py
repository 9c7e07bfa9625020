"""Webhooks: check the URL, sign per Standard Webhooks, deliver, retry.

Delivery is at-least-once. Every attempt for one job carries the same ``webhook-id`` (chosen
when the job is created and kept in its record), so a receiver de-duplicates on it; the
``webhook-timestamp`` and the signature are those of the attempt
(https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md).

An attempt fails on a network error, a timeout or any status but 2xx (redirects are not
followed: a 3xx is a failure). Failed attempts are retried after an exponential backoff with
jitter; each is recorded on the job, and the time of the next one too. ``Deliverer.attempt``
makes one attempt and never waits for the next: the next is a scheduled item (a saq job
with ``scheduled=``, or the local loop's timer, ``jobs.local``), so a receiver that is down
holds no job slot while its retries wait, and a restarted process resumes the schedule
instead of starting it over.

The URL is checked at every attempt against the addresses its name resolves to then, and the
request goes to the address that was checked (the name still in ``Host`` and TLS SNI), so a
name that resolves to a public address for the check and a private one for the request
cannot reach inside the network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson
from standardwebhooks.webhooks import Webhook

from ..config import Settings
from ..errors import ValidationFailed
from .model import Attempt, Job, WebhookState, iso
from .store import JobStore

log = logging.getLogger("tokenrelay.webhooks")


class Refused(Exception):
    """The URL may not be delivered to: a permanent failure, not retried."""


def check_url_syntax(url: str, *, allow_internal: bool = False) -> str:
    """Refuse a webhook URL that could never work, or names a private address outright,
    when the job is submitted (a name is checked at each attempt, against what it resolves
    to then: ``resolve``)."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # e.g. "http://[::1": an unclosed IPv6 bracket
        raise ValidationFailed(f"webhook_url: not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise ValidationFailed("webhook_url: must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValidationFailed("webhook_url: must not carry credentials")
    try:
        _ = parts.port
    except ValueError:
        raise ValidationFailed("webhook_url: the port is not a number from 0 to 65535") from None
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(hostname)
    except ValueError:
        literal = None  # a name, or a zone-scoped IPv6 address, which is link-local anyway
        if "%" in hostname and not allow_internal:
            raise ValidationFailed(f"webhook_url: {hostname} is a link-local address; webhooks go to public "
                                   "addresses (allow with TOKENRELAY_WEBHOOK_ALLOW_PRIVATE=true)") from None
    if literal is not None and not allow_internal and is_internal(literal):
        raise ValidationFailed(f"webhook_url: {literal} is a private, loopback or link-local address; webhooks go "
                               "to public addresses (allow with TOKENRELAY_WEBHOOK_ALLOW_PRIVATE=true)")
    return url


NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
"""The well-known NAT64 prefix (RFC 6052): the last 32 bits are the IPv4 address reached."""
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
"""Deprecated IPv4-compatible addresses (``::a.b.c.d``, RFC 4291): no public use left, and
some stacks still route them to the IPv4 address inside."""


def is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Private, loopback, link-local and the like: not somewhere on the public internet.

    An IPv6 address that carries an IPv4 address (IPv4-mapped, NAT64, 6to4) is judged by
    the IPv4 address it reaches; IPv4-compatible and site-local addresses are internal."""
    if isinstance(address, ipaddress.IPv6Address):
        if address in IPV4_COMPATIBLE or address.is_site_local:
            return True
        inner = address.ipv4_mapped or address.sixtofour
        if inner is None and address in NAT64:
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if inner is not None:
            address = inner
    return not address.is_global or address.is_multicast


async def resolve(url: str, *, allow_internal: bool) -> str:
    """The address to connect to for ``url``; ``Refused`` when none may be used."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not allow_internal:
        # Every address must be public: a name with one private address among public ones
        # could be made to reach the private one.
        internal = [a for a in addresses if is_internal(a)]
        if internal:
            raise Refused(f"{host} resolves to {internal[0]}, a private, loopback or link-local address "
                          "(allow with TOKENRELAY_WEBHOOK_ALLOW_PRIVATE=true)")
    return str(addresses[0])


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """``url`` aimed at ``address``: the new URL, the Host header and the TLS server name."""
    parts = urlsplit(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parts.port}" if parts.port else host
    target = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.netloc.rpartition("@")[2]
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return target, {"host": host_header}, extensions


def backoff(attempt: int, *, base: float, cap: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (from 1): doubling from
    ``base``, at most ``cap``, with "equal jitter" (half fixed, half random) so receivers
    that come back do not get every retry at once."""
    delay = min(cap, base * 2.0 ** (attempt - 1))
    return delay / 2 + random.uniform(0, delay / 2)


class Deliverer:
    """Makes a job's webhook attempts and records each on the job."""

    def __init__(self, settings: Settings, store: JobStore) -> None:
        secret = settings.webhook_secret
        self.signer = Webhook(secret.get_secret_value()) if secret else None
        self.settings = settings
        self.store = store
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(settings.webhook_timeout),
            headers={"user-agent": "tokenrelay-webhooks"},
            trust_env=False,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def headers(self, job: Job, body: bytes) -> dict[str, str]:
        assert self.signer is not None and job.webhook is not None
        at = datetime.now(tz=UTC)
        msg_id = job.webhook.id
        return {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": self.signer.sign(msg_id, at, body.decode()),
        }

    async def send(self, job: Job, number: int) -> tuple[Attempt, bool]:
        """One request; its record, and whether a failure is permanent."""
        assert job.webhook is not None
        url = job.webhook.url
        body = orjson.dumps(job.payload())
        started = time.perf_counter()
        at = iso(time.time())
        status: int | None = None
        error: str | None = None
        permanent = False
        try:
            address = await resolve(url, allow_internal=self.settings.webhook_allow_private)
            target, host, extensions = pinned(url, address)
            request = self.client.build_request("POST", target, content=body,
                                                headers={**self.headers(job, body), **host},
                                                extensions=extensions)
            response = await self.client.send(request)
            await response.aclose()
            status = response.status_code
            if not 200 <= status < 300:
                error = f"receiver answered {status}" + (" (redirects are not followed)"
                                                         if 300 <= status < 400 else "")
        except Refused as exc:
            error, permanent = str(exc), True
        except socket.gaierror as exc:
            error = f"cannot resolve {urlsplit(url).hostname}: {exc.strerror}"
        except httpx.TimeoutException:
            error = f"no answer within {self.settings.webhook_timeout:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration = int((time.perf_counter() - started) * 1000)
        return Attempt(number, at, status, duration, error), permanent

    async def attempt(self, job: Job) -> Job:
        """One attempt at a pending webhook, recorded with what follows it: delivered,
        failed for good, or the time the next attempt is due (``job.delivery_due``)."""
        hook = job.webhook
        if hook is None or hook.state is not WebhookState.PENDING:
            return job
        number = len(job.deliveries) + 1

        def record(attempt: Attempt | None, state: WebhookState, due: float = 0.0) -> Callable[[Job], Job | None]:
            # Only onto the record this attempt was made from: a duplicate run of the same
            # attempt (at-least-once queues) does not log it twice.
            def change(current: Job) -> Job | None:
                if current.delivery_due is None or len(current.deliveries) != number - 1:
                    return None
                return current.attempted(attempt, state, due)
            return change

        if self.signer is None:
            log.error("job %s: webhook not sent: TOKENRELAY_WEBHOOK_SECRET is not set", job.id)
            return await self.store.update(job.id, record(None, WebhookState.FAILED)) or job
        settings = self.settings
        result, permanent = await self.send(job, number)
        if result.ok:
            change = record(result, WebhookState.DELIVERED)
            log.info("job %s: webhook %s delivered (attempt %d, %d)", job.id, hook.id, number, result.status_code)
        elif permanent or number >= settings.webhook_max_attempts:
            change = record(result, WebhookState.FAILED)
            log.warning("job %s: webhook %s given up after attempt %d: %s", job.id, hook.id, number, result.error)
        else:
            delay = backoff(number, base=settings.webhook_backoff, cap=settings.webhook_backoff_max)
            change = record(result, WebhookState.PENDING, time.time() + delay)
            log.info("job %s: webhook attempt %d failed (%s); next in %.2f s", job.id, number, result.error, delay)
        return await self.store.update(job.id, change) or await self.store.get(job.id) or job
