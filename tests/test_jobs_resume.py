"""``GET /api/jobs/{id}/stream`` picks up where a follower left off (``Last-Event-ID`` or
``?after=N``): a real relay, the real simulator, and Chromium's own EventSource reconnecting
through a connection that a real TCP proxy cuts midway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from cutter import Cutter
from playwright.sync_api import Browser
from servers import RelayServer, SimServer, wait_until
from streams import chat

from tokenrelay.providers.sse_decoder import SSEDecoder

Event = tuple[str, str | None, Any]  # (event, id, data)


@pytest.fixture(scope="module")
def relay(sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> RelayServer:
    # CORS for the EventSource test, whose page is served by the relay and whose stream
    # goes through the cutting proxy's port: another origin.
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_CORS_ORIGINS="*")


@pytest.fixture()
def client(relay: RelayServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=relay.url, timeout=10) as c:
        yield c


def submit(client: httpx.Client, model: str) -> str:
    response = client.post("/api/jobs", json=chat("resume me", model=model))
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def follow(client: httpx.Client, job_id: str, *, headers: dict[str, str] | None = None, query: str = "",
           stop_after_id: int | None = None) -> list[Event]:
    """The stream's events; with ``stop_after_id``, leave once that event has arrived."""
    decoder = SSEDecoder()
    events: list[Event] = []
    with client.stream("GET", f"/api/jobs/{job_id}/stream{query}", headers=headers or {}) as response:
        assert response.status_code == 200, response.read()
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                events.append((event.event, event.id, orjson.loads(event.data)))
                if stop_after_id is not None and event.id == str(stop_after_id):
                    return events
    return events


def text_of(events: list[Event]) -> str:
    return "".join(data["text"] for kind, _, data in events if kind == "message")


def ids_of(events: list[Event]) -> list[int]:
    return [int(event_id) for kind, event_id, _ in events if kind == "message" and event_id]


def result_text(client: httpx.Client, job_id: str) -> str:
    def ended() -> dict[str, Any] | None:
        job = client.get(f"/api/jobs/{job_id}").json()
        return job if job["status"] not in ("queued", "running") else None
    return str(wait_until(ended, timeout=15)["result"]["text"])


def test_last_event_id_resumes_a_running_job_without_duplicate_or_gap(client: httpx.Client) -> None:
    job_id = submit(client, "sim:ttft=0,tps=40,tokens=60")
    first = follow(client, job_id, stop_after_id=5)
    assert ids_of(first) == [1, 2, 3, 4, 5]
    rest = follow(client, job_id, headers={"last-event-id": "5"})
    assert rest[0][0] == "start"
    assert ids_of(rest)[0] == 6
    assert ids_of(first) + ids_of(rest) == list(range(1, len(ids_of(first) + ids_of(rest)) + 1))
    assert rest[-1][0] == "done" and rest[-1][2]["usage"]["completion_tokens"] == 60
    assert text_of(first) + text_of(rest) == result_text(client, job_id)


def test_after_resumes_an_ended_job_numbered_as_it_was_live(client: httpx.Client) -> None:
    job_id = submit(client, "sim:ttft=0,tps=200,tokens=30")
    whole = follow(client, job_id)
    assert whole[-1][0] == "done"
    n = len(ids_of(whole))
    assert n > 10
    rest = follow(client, job_id, query="?after=7")
    assert ids_of(rest) == list(range(8, n + 1))
    assert text_of(whole[: 1 + 7]) + text_of(rest) == text_of(whole) == result_text(client, job_id)
    assert rest[-1][0] == "done"
    # ?after wins over the header, as for /api/streams/{id}
    assert ids_of(follow(client, job_id, query=f"?after={n}", headers={"last-event-id": "1"})) == []


def test_after_the_last_piece_gets_only_the_end(client: httpx.Client) -> None:
    job_id = submit(client, "sim:ttft=0,tps=0,tokens=5")
    result_text(client, job_id)
    events = follow(client, job_id, headers={"last-event-id": "999"})
    assert [kind for kind, _, _ in events] == ["start", "done"]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5"])
def test_a_bad_cursor_is_a_422(client: httpx.Client, value: str) -> None:
    job_id = submit(client, "sim:ttft=0,tps=0,tokens=3")
    response = client.get(f"/api/jobs/{job_id}/stream", headers={"last-event-id": value})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["message"].startswith("after:")


def test_a_job_whose_pieces_are_gone_resumes_with_a_reset(sim_server: SimServer, tmp_path,
                                                            start_relay: Callable[..., RelayServer]) -> None:
    """After a restart the SQLite store has the job's text but not its pieces: a follower
    that asks from N gets the whole text as ``reset``, never a silent gap."""
    data = {"TOKENRELAY_DATA_DIR": str(tmp_path)}
    before = start_relay(upstream=sim_server.url + "/v1", **data)
    with httpx.Client(base_url=before.url, timeout=10) as first:
        job_id = submit(first, "sim:ttft=0,tps=0,tokens=12")
        text = result_text(first, job_id)
    before.stop()
    after = start_relay(upstream=sim_server.url + "/v1", **data)
    with httpx.Client(base_url=after.url, timeout=10) as second:
        events = follow(second, job_id, headers={"last-event-id": "4"})
        assert [kind for kind, _, _ in events] == ["start", "reset", "done"]
        assert events[1][2] == {"text": text}
        assert events[1][1] == "4"
        # From the start, the whole text is an ordinary piece.
        assert text_of(follow(second, job_id)) == text


def test_the_sqlite_store_keeps_ended_pieces_within_its_bounds(tmp_path, monkeypatch) -> None:
    """The last ENDED_FEEDS ended jobs, and ENDED_FEED_CHARS of their text, the oldest given up first."""
    import asyncio

    from tokenrelay.jobs import store as jobs_store

    monkeypatch.setattr(jobs_store, "ENDED_FEEDS", 2)
    monkeypatch.setattr(jobs_store, "ENDED_FEED_CHARS", 11)

    async def run() -> list[list[str]]:
        store = jobs_store.SQLiteJobStore(tmp_path)
        try:
            for job_id, text in (("a", "x"), ("b", "y"), ("c", "z"), ("d", "0123456789")):
                await store.live_start(job_id)
                await store.live_append(job_id, text)
                await store.live_end(job_id, jobs_store.FollowEvent("done", data={}))
            # No records were written: a job whose pieces are given up is followed as unknown.
            return [[event.text async for event in store.follow(job_id) if event.kind == "text"]
                    for job_id in "abcd"]
        finally:
            await store.aclose()

    assert asyncio.run(run()) == [[], [], ["z"], ["0123456789"]]


# Last: the module's Chromium keeps an event loop in this thread until the module ends,
# and the test above runs one of its own.
def test_chromium_eventsource_reconnects_without_duplicating_text(relay: RelayServer, client: httpx.Client,
                                                                  browser: Browser) -> None:
    job_id = submit(client, "sim:ttft=0,tps=10,tokens=80")
    with Cutter(relay.url, cut_after=600) as cutter:
        # The page's own CSP allows no eval (wait_for_function) and no other origin (the
        # cutting proxy): this test drives a bare EventSource from the page's origin.
        context = browser.new_context(bypass_csp=True)
        page = context.new_page()
        try:
            page.goto(relay.url + "/")
            page.evaluate("""([url]) => {
                window.got = {ids: [], text: "", ended: null, errors: 0};
                const source = new EventSource(url);
                source.onmessage = (e) => { window.got.ids.push(Number(e.lastEventId));
                                            window.got.text += JSON.parse(e.data).text; };
                source.onerror = () => { window.got.errors += 1; };
                source.addEventListener("done", () => { window.got.ended = "done"; source.close(); });
            }""", [f"{cutter.url}/api/jobs/{job_id}/stream"])
            page.wait_for_function("window.got.ended !== null", timeout=30_000)
            got = page.evaluate("window.got")
        finally:
            context.close()
        assert cutter.cut_count == 1 and cutter.connections >= 2
    assert got["errors"] >= 1  # the cut was seen, and EventSource reconnected by itself
    assert got["ids"] == list(range(1, len(got["ids"]) + 1))
    assert got["text"] == result_text(client, job_id)
