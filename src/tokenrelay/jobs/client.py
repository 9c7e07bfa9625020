"""The client side of ``tokenrelay ask --job``: submit a job, wait for it, show progress."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import httpx

from ..ask import AskFailed, refusal_message

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def submit(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = client.post(url + "/api/jobs", json=body)
    except httpx.ConnectError as exc:
        raise AskFailed(f"cannot reach {url}: {exc}") from None
    if response.status_code != 202:
        raise AskFailed(refusal_message(response))
    return dict(response.json())


def wait(client: httpx.Client, url: str, job_id: str, *, progress: Callable[[str, float, str], Any],
         interval: float = 0.25, timeout: float = 3600) -> dict[str, Any]:
    """Poll until the job ends, calling ``progress(status, seconds, spinner)`` on each poll."""
    started = time.monotonic()
    for frame in itertools.cycle(SPINNER):
        try:
            response = client.get(f"{url}/api/jobs/{job_id}")
        except httpx.TransportError:
            response = None  # the service restarting: the job survives it, keep waiting
        elapsed = time.monotonic() - started
        if response is not None:
            if response.status_code != 200:
                raise AskFailed(refusal_message(response))
            job = dict(response.json())
            if job["status"] not in ("queued", "running"):
                return job
            progress(job["status"], elapsed, frame)
        else:
            progress("reconnecting", elapsed, frame)
        if elapsed > timeout:
            raise AskFailed(f"job {job_id} has not ended within {timeout:.0f} s; it goes on on the service")
        time.sleep(interval)
    raise AssertionError("unreachable")
