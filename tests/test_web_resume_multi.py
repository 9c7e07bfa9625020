"""The page keeps an answer going when its connection lands on another instance: two real
tokenrelay processes share a real redis-server behind one address (a TCP switch standing for
a load balancer). An answer starts on one instance; the network then switches every
connection to the other — first with the page left as it is (it reconnects by itself), then
with a reload — and the rest of the answer comes out of Redis while the first instance's
model writes it: no gap, no duplicate."""

from __future__ import annotations

import re
from collections.abc import Callable

from cutter import Cutter
from playwright.sync_api import Browser, expect
from servers import RelayServer, SimServer, wait_until
from test_web import snapshot
from test_web_chat import echo, new_chat, wait_done


def test_an_answer_goes_on_when_its_connection_lands_on_the_other_instance(
        browser: Browser, redis_url: str, sim_server: SimServer, start_relay: Callable[..., RelayServer]) -> None:
    a, b = (start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_REDIS_URL=redis_url,
                        TOKENRELAY_JOBS_IN_SERVE="false") for _ in range(2))
    resumes: list[str] = []
    with Cutter(a.url, cut_after=[]) as switch:
        chat = new_chat(browser, switch.url)
        try:
            page = chat.page
            page.on("request", lambda r: resumes.append(r.url) if "/api/streams/" in r.url and r.method == "GET"
                    else None)
            words = " ".join(f"w{i:02d}" for i in range(60))

            # A network switch mid-answer: the page goes on by itself, from B.
            msg = chat.ask(words, model=echo(tps=15))
            wait_until(lambda: len((snapshot(page) or {}).get("text", "")) > 30, timeout=30)
            switch.switch_to(b.url)  # A is out of reach from here on
            wait_done(msg)
            assert msg.locator(".md").text_content() == words
            expect(msg.locator(".stats")).to_contain_text("continued after a lost connection")
            assert len(resumes) == 1, resumes
            owner = stream_of(resumes[0])
            wait_until(lambda: answered(a, owner), timeout=10)  # A's model wrote it to the end

            # A reload that lands on the other instance: the answer goes on from A.
            msg = chat.ask(words + " again", model=echo(tps=15))
            wait_until(lambda: len((snapshot(page) or {}).get("text", "")) > 30, timeout=30)
            switch.switch_to(a.url)
            page.reload()
            msg = chat.last
            wait_done(msg)
            assert msg.locator(".md").text_content() == words + " again"
            second = stream_of(resumes[-1])
            assert second != owner
            wait_until(lambda: answered(b, second), timeout=10)
        finally:
            chat.page.context.close()
    assert not answered(b, owner) and not answered(a, second)  # each model ran once, on its own instance


def stream_of(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?")[0]


def answered(relay: RelayServer, stream_id: str) -> bool:
    return re.search(rf"/api/get-response {stream_id} status=200 .*outcome=completed", relay.log()) is not None
