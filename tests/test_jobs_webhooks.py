"""Webhook delivery in detail: which addresses are refused, the backoff, redirects and
timeouts against real receivers, and the JavaScript check of docs/jobs.md run by Node.js."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from tokenrelay.config import Settings
from tokenrelay.jobs.model import Job, JobStatus, Result, new_job
from tokenrelay.jobs.store import SQLiteJobStore
from tokenrelay.jobs.webhooks import Deliverer, Refused, backoff, is_internal, pinned, resolve
from webhook_receiver import SECRET, running_receiver, serving

DOCS = Path(__file__).parent.parent / "docs" / "jobs.md"


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                                     "224.0.0.1",
                                     # IPv4 inside IPv6: NAT64, IPv4-compatible, 6to4; and site-local
                                     "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "::127.0.0.1", "::8.8.8.8",
                                     "2002:7f00:1::", "2002:c0a8:101::1", "fec0::1"])
def test_internal_addresses(address: str) -> None:
    assert is_internal(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808",
                                     "2002:808:808::1"])
def test_public_addresses(address: str) -> None:
    assert not is_internal(ipaddress.ip_address(address))


def test_resolve_refuses_names_that_resolve_inside() -> None:
    with pytest.raises(Refused, match="localhost resolves to"):
        asyncio.run(resolve("http://localhost:8080/x", allow_internal=False))
    assert asyncio.run(resolve("http://localhost:8080/x", allow_internal=True)) in ("127.0.0.1", "::1")
    with pytest.raises(Refused):
        asyncio.run(resolve("https://[::1]/x", allow_internal=False))


def test_pinned_keeps_the_name_for_host_and_tls() -> None:
    target, headers, extensions = pinned("https://hooks.example.com:8443/a?b=1", "2001:db8::5")
    assert target == "https://[2001:db8::5]:8443/a?b=1"
    assert headers == {"host": "hooks.example.com:8443"} and extensions == {"sni_hostname": "hooks.example.com"}
    target, headers, extensions = pinned("http://hooks.example.com", "93.184.216.34")
    assert target == "http://93.184.216.34/" and headers == {"host": "hooks.example.com"} and extensions == {}


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    for attempt, full in ((1, 2.0), (2, 4.0), (3, 8.0), (12, 900.0)):
        delays = [backoff(attempt, base=2.0, cap=900.0) for _ in range(200)]
        assert all(full / 2 <= d <= full for d in delays)
        assert max(delays) - min(delays) > full / 10  # really random


def ended_job(url: str) -> Job:
    job = new_job(request={"messages": [{"role": "user", "content": "x"}]}, model="sim", webhook_url=url,
                  idempotency_key=None, body_hash="")
    return dataclasses.replace(job.started().ended(Result("ok", "stop"), None), finished_at="2026-11-25T21:00:00.000Z")


def deliver_once(url: str, **settings: Any) -> dict[str, Any]:
    """One job's delivery, through the real Deliverer and store, to ``url``: every attempt,
    each when the record says it is due."""
    async def go() -> dict[str, Any]:
        config = Settings(webhook_secret=SECRET, webhook_allow_private=True, webhook_backoff=0.01,
                          webhook_backoff_max=0.02, data_dir=Path(tempfile.mkdtemp()), **settings)
        store = SQLiteJobStore(config.data_dir)
        deliverer = Deliverer(config, store)
        try:
            job, _ = await store.create(ended_job(url))
            while (due := job.delivery_due) is not None:
                await asyncio.sleep(max(0.0, due - time.time()))  # the schedule itself is what is tested
                job = await deliverer.attempt(job)
            return job.public()
        finally:
            await deliverer.aclose()
            await store.aclose()
    return asyncio.run(go())


def test_redirects_are_not_followed() -> None:
    hits: list[str] = []

    async def moved(request: Request) -> Response:
        hits.append(request.url.path)
        return RedirectResponse("/elsewhere", status_code=307)

    async def elsewhere(request: Request) -> Response:
        hits.append(request.url.path)
        return Response(status_code=204)

    app = Starlette(routes=[Route("/hook", moved, methods=["POST"]), Route("/elsewhere", elsewhere, methods=["POST"])])
    with serving(app) as base:
        job = deliver_once(base + "/hook", webhook_max_attempts=2)
    assert hits == ["/hook", "/hook"]
    assert job["webhook"]["state"] == "failed"
    assert [d["status_code"] for d in job["deliveries"]] == [307, 307]
    assert "redirects are not followed" in job["deliveries"][0]["error"]


def test_a_receiver_that_does_not_answer_in_time() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Response:
        await asyncio.wait_for(release.wait(), 5)
        return Response(status_code=204)

    with serving(Starlette(routes=[Route("/hook", slow, methods=["POST"])])) as base:
        try:
            job = deliver_once(base + "/hook", webhook_max_attempts=2, webhook_timeout=0.3)
        finally:
            release.set()
    assert job["webhook"]["state"] == "failed"
    assert [d["error"] for d in job["deliveries"]] == ["no answer within 0.3 s"] * 2
    assert all(250 <= d["duration_ms"] < 3000 for d in job["deliveries"])


def test_an_unreachable_receiver_is_retried() -> None:
    from servers import free_port

    job = deliver_once(f"http://127.0.0.1:{free_port()}/hook", webhook_max_attempts=3)
    assert job["webhook"]["state"] == "failed" and len(job["deliveries"]) == 3
    assert all(d["status_code"] is None and "ConnectError" in d["error"] for d in job["deliveries"])


def js_block(after: str) -> str:
    text = DOCS.read_text()
    start = text.index("```js", text.index(after)) + len("```js")
    return text[start:text.index("```", start)]


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_the_javascript_check_in_the_docs_verifies_a_real_delivery() -> None:
    with running_receiver() as (url, receiver):
        deliver_once(url)
        delivery = receiver.deliveries[0]
    script = js_block("with `node:crypto` only") + """
const input = JSON.parse(process.argv[2]);
const event = verify(input.secret, input.headers, input.body);
let forged = "accepted";
try { verify(input.secret, input.headers, input.body.replace("ok", "OK")); } catch { forged = "refused"; }
console.log(JSON.stringify({type: event.type, text: event.data.result.text, forged}));
"""
    argument = json.dumps({"secret": SECRET, "headers": delivery.headers, "body": delivery.body.decode()})
    with tempfile.NamedTemporaryFile("w", suffix=".mjs", delete=False) as f:
        f.write(script)
    result = subprocess.run(["node", f.name, argument], check=False, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"type": "job.succeeded", "text": "ok", "forged": "refused"}


def test_the_payload_is_the_documented_shape() -> None:
    job = new_job(request={"messages": []}, model="m", webhook_url="https://example.com/h", idempotency_key=None,
                  body_hash="")
    job = dataclasses.replace(job, status=JobStatus.SUCCEEDED, finished_at="2026-11-25T21:00:03.410Z")
    body = job.payload()
    assert body["type"] == "job.succeeded" and body["timestamp"] == "2026-11-25T21:00:03.410Z"
    assert set(body["data"]) == {"id", "status", "model", "result", "error", "created_at", "started_at",
                                 "finished_at", "webhook"}
    documented = re.search(r'"data": \{(.*?)\}\}\}', DOCS.read_text(), re.DOTALL)
    assert documented is not None
    for field in body["data"]:
        assert f'"{field}"' in documented.group(1)
    assert orjson.dumps(job.payload()) == orjson.dumps(body)  # the same bytes every time
