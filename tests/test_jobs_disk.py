"""The data directory failing under a real ``tokenrelay serve``: mounted read-only, and a
small tmpfs filled up while a job runs, then freed. Old jobs go after the retention.

Mounting needs root (CAP_SYS_ADMIN); without it these tests are skipped, not faked."""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import RelayServer, SimServer, wait_until
from streams import chat
from test_jobs import read_events, submit, wait_ended


def _mount(options: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tokenrelay-mnt-"))
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tokenrelay-test", str(path)],
                            capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)
        path.rmdir()


@pytest.fixture()
def small_disk() -> Iterator[Path]:
    yield from _mount("size=2m")


@pytest.fixture()
def read_only_dir() -> Iterator[Path]:
    yield from _mount("ro,size=1m")


def fill(directory: Path) -> Path:
    """Write a file until the file system has no room left; the file, to free it later."""
    filler = directory / "filler"
    block = b"\0" * 65536
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    # The last blocks may be partly free: fill them too, byte by byte would be slow, 512 at a time is not.
    with open(filler, "ab", buffering=0) as f:
        try:
            while True:
                f.write(block[:512])
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_read_only_data_directory_leaves_streaming_up(read_only_dir: Path, sim_server: SimServer,
                                                       start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_DATA_DIR=str(read_only_dir / "data"))
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        assert client.post("/api/get-response", json=chat(stream=False)).status_code == 200
        response = client.post("/api/jobs", json=chat())
        assert response.status_code == 503
        message = response.json()["error"]["message"]
        assert "data directory" in message and "TOKENRELAY_DATA_DIR" in message
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.json()["jobs"]["status"] == "unavailable" and "data directory" in ready.json()["jobs"]["reason"]
    assert "Traceback" not in relay.log()


def test_a_full_disk_refuses_new_jobs_and_ends_accepted_ones_when_room_returns(
        small_disk: Path, sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_DATA_DIR=str(small_disk))
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        job_id = submit(client, chat(model="sim:ttft=0,tps=25,tokens=50"))["id"]
        followed: dict[str, Any] = {}
        follower = threading.Thread(target=lambda: followed.update(events=read_events(client, job_id)[0]))
        follower.start()
        filler = fill(small_disk)
        try:
            refused = client.post("/api/jobs", json=chat())
            assert refused.status_code == 507, refused.text
            assert refused.json()["error"]["type"] == "insufficient_storage"
            assert refused.headers["retry-after"].isdigit()
            wait_until(lambda: "cannot record its end" in relay.log(), timeout=15)
            assert client.get(f"/api/jobs/{job_id}").json()["status"] == "running"
            jobs = client.get("/readyz").json()["jobs"]
            assert jobs["status"] == "degraded" and "full" in jobs["reason"]
        finally:
            os.unlink(filler)
        # Room again: the answer already written is recorded, and the follower gets its end.
        job = wait_ended(client, job_id, timeout=30)
        assert job["status"] == "succeeded" and job["result"]["text"]
        follower.join(timeout=10)
        assert not follower.is_alive()
        kinds = [kind for kind, _ in followed["events"]]
        assert kinds[0] == "start" and "message" in kinds and kinds[-1] == "done"
        assert wait_until(lambda: client.get("/readyz").json()["jobs"]["status"] == "ok", timeout=15)
    assert relay.log().count("cannot record its end") == 1  # said once, not at every try


def test_old_jobs_are_deleted_after_the_retention(sim_server: SimServer,
                                                  start_relay: Callable[..., RelayServer]) -> None:
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_JOB_RETENTION="1")
    with httpx.Client(base_url=relay.url, timeout=10) as client:
        job_id = submit(client, chat(model="sim:ttft=0,tps=0"))["id"]
        wait_ended(client, job_id)
        wait_until(lambda: client.get(f"/api/jobs/{job_id}").status_code == 404, timeout=15)
    assert "older than 1 s" in relay.log()
