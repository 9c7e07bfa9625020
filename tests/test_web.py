"""Browser tests for the tokenrelay web chat page.

A real headless Chromium (Debian's ``chromium`` package) is driven through
Playwright's sync API against a real ``tokenrelay serve`` whose upstream is
a standalone ``tokenrelay sim`` process (fixtures from ``conftest.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import httpx
import pytest
from playwright.sync_api import Page, expect

ARTIFACTS = Path(__file__).parent / "artifacts"
XSS = "<img src=x onerror=alert(1)>"

expect.set_options(timeout=15_000)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value: {last!r})")


def snapshot(page: Page, index: int = -1) -> dict:
    """Read state and text of one assistant message in a single JS turn."""
    return page.evaluate(
        """(i) => {
            const all = document.querySelectorAll('#conversation .msg.assistant');
            const m = all[i < 0 ? all.length + i : i];
            if (!m) return null;
            return {state: m.dataset.state, text: m.querySelector('.text').textContent};
        }""",
        index,
    )


class Chat:
    """Small driver for the chat page."""

    def __init__(self, page: Page, base_url: str):
        self.page = page
        self.base_url = base_url
        self.dialogs: list[str] = []
        self.page_errors: list[str] = []
        self.requests: list[dict] = []
        page.on("dialog", self._on_dialog)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("request", self._on_request)

    def _on_dialog(self, dialog) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    def _on_request(self, request) -> None:
        if request.method == "POST" and request.url.endswith("/api/get-response"):
            self.requests.append(
                {"body": json.loads(request.post_data or "null"), "headers": request.headers}
            )

    def open(self) -> "Chat":
        self.page.goto(self.base_url + "/")
        # /api/info has been applied once the label left its "unknown" state.
        expect(self.page.locator("#upstream")).not_to_have_attribute("data-simulated", "unknown")
        return self

    @property
    def assistants(self):
        return self.page.locator("#conversation .msg.assistant")

    @property
    def last(self):
        return self.assistants.last

    def ask(self, prompt: str, model: str | None = None):
        if model is not None:
            self.page.fill("#model", model)
        self.page.fill("#prompt", prompt)
        before = self.assistants.count()
        self.page.click("#send")
        expect(self.assistants).to_have_count(before + 1)
        return self.last


@pytest.fixture()
def chat(browser, relay_server):
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    page = context.new_page()
    c = Chat(page, relay_server.url).open()
    try:
        yield c
        assert c.page_errors == [], f"uncaught errors in the page: {c.page_errors}"
    finally:
        context.close()


def wait_no_open_streams(sim_server, timeout: float = 5.0) -> dict:
    return wait_until(
        lambda: (lambda s: s if s["open_streams"] == 0 else None)(sim_server.stats()),
        timeout=timeout,
        what="the simulator to have no open streams",
    )


# ---------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------


def test_header_shows_upstream_and_prefills_model(chat: Chat):
    page = chat.page
    info = page.request.get(chat.base_url + "/api/info").json()
    label = page.locator("#upstream")
    expect(label).to_have_attribute("data-simulated", "true" if info["simulated"] else "false")
    if info["simulated"]:
        expect(label).to_contain_text("Simulator — no model API configured")
        expect(label).to_contain_text("not a real model")
    else:
        expect(label).to_contain_text(info["upstream"])
        if info["model"]:
            expect(label).to_contain_text(info["model"])
    expect(page.locator("#model")).to_have_value(info["model"] or "")
    # accessibility hooks
    expect(page.locator("#conversation")).to_have_attribute("aria-live", "polite")
    expect(page.get_by_label("Message")).to_have_id("prompt")
    expect(page.get_by_label("Model")).to_have_id("model")
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_header_says_when_the_simulator_answers(browser, start_relay):
    server = start_relay(upstream=None)
    info = httpx.get(server.url + "/api/info", timeout=5).json()
    assert info["simulated"] is True
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    try:
        sim_chat = Chat(context.new_page(), server.url).open()
        label = sim_chat.page.locator("#upstream")
        expect(label).to_have_attribute("data-simulated", "true")
        expect(label).to_contain_text("Simulator — no model API configured")
        expect(label).to_be_visible()
        msg = sim_chat.ask("hello simulator", model="sim:echo")
        expect(msg).to_have_attribute("data-state", "done")
        expect(msg.locator(".text")).to_have_text("hello simulator")
        assert sim_chat.page_errors == []
    finally:
        context.close()


def test_answer_grows_while_streaming(chat: Chat):
    msg = chat.ask("Tell me something long.", model="sim:tps=10,tokens=40")
    expect(msg).to_have_attribute("data-state", "streaming")
    expect(chat.page.locator("#stop")).to_be_enabled()
    expect(chat.page.locator("#send")).to_be_disabled()

    first = wait_until(
        lambda: (lambda s: s if s and s["text"] and s["state"] == "streaming" else None)(snapshot(chat.page)),
        what="first text while streaming",
    )
    second = wait_until(
        lambda: (lambda s: s if s and len(s["text"]) > len(first["text"]) else None)(snapshot(chat.page)),
        what="the answer to grow",
    )
    assert second["state"] == "streaming", "second snapshot must still be taken while streaming"
    assert second["text"].startswith(first["text"]), (first, second)
    assert len(second["text"]) > len(first["text"])

    expect(msg).to_have_attribute("data-state", "done", timeout=30_000)
    final = snapshot(chat.page)
    assert final["text"].startswith(second["text"]) and len(final["text"]) > len(second["text"])
    # Multi-byte characters split across chunks must decode cleanly.
    assert "\ufffd" not in final["text"]

    stats = msg.locator(".stats")
    expect(stats).to_be_visible()
    expect(stats).to_contain_text("first token")
    expect(stats).to_contain_text("tokens/s")
    ttft = float(stats.get_attribute("data-ttft-ms"))
    tps = float(stats.get_attribute("data-tps"))
    assert ttft >= 0
    # 40 tokens at ~10 tokens/s: the measured rate must be in that ballpark.
    assert 2 < tps < 40, tps
    expect(msg.locator(".error")).to_be_hidden()
    expect(chat.page.locator("#stop")).to_be_disabled()
    expect(chat.page.locator("#send")).to_be_enabled()


def test_stop_cancels_upstream(chat: Chat, sim_server):
    before = wait_no_open_streams(sim_server)
    msg = chat.ask("Write a very long story.", model="sim:tps=5,tokens=400")
    expect(msg.locator(".text")).not_to_have_text("")
    wait_until(lambda: sim_server.stats()["open_streams"] >= 1, what="an open simulator stream")
    partial = snapshot(chat.page)["text"]

    chat.page.click("#stop")
    expect(msg).to_have_attribute("data-state", "stopped")
    expect(msg.locator(".badge")).to_have_text("STOPPED")
    expect(msg.locator(".badge")).to_be_visible()
    assert snapshot(chat.page)["text"].startswith(partial), "partial text must be kept"

    after = wait_no_open_streams(sim_server, timeout=3.0)
    assert after["total_streams"] > before["total_streams"]
    assert after["cancelled_streams"] > before["cancelled_streams"]
    expect(chat.page.locator("#stop")).to_be_disabled()
    expect(chat.page.locator("#send")).to_be_enabled()


def test_markup_in_answer_is_rendered_as_text(chat: Chat):
    msg = chat.ask(XSS, model="sim:echo")
    expect(msg).to_have_attribute("data-state", "done")
    text = msg.locator(".text")
    assert XSS in text.text_content()
    assert XSS in chat.page.locator("#conversation .msg.user .text").last.text_content()
    expect(chat.page.locator("#conversation img")).to_have_count(0)
    # Rendered as Markdown: one paragraph of text, no element made from the markup.
    assert msg.locator(".text").evaluate("e => [...e.querySelectorAll('*')].map((n) => n.tagName)") == ["P"]
    # Give any injected image time to fail loading: a probe image with the
    # same broken source must report its error, and by then nothing fired.
    chat.page.evaluate(
        """() => new Promise((resolve) => {
            const probe = new Image();
            probe.onerror = probe.onload = () => resolve(true);
            probe.src = 'x?probe=' + Date.now();
        })"""
    )
    assert chat.dialogs == []


def test_midway_failure_is_marked_failed(chat: Chat):
    msg = chat.ask("This will break.", model="sim:fault=error-mid")
    expect(msg).to_have_attribute("data-state", "failed")
    error = msg.locator(".error")
    expect(error).to_be_visible()
    assert error.text_content().strip(), "error must show type/message"
    assert msg.locator(".text").text_content(), "partial text must be kept"
    expect(msg.locator(".badge")).to_have_text("FAILED")
    expect(chat.page.locator("#send")).to_be_enabled()

    # A failed answer is not sent as history with the next question.
    nxt = chat.ask("And now?", model="sim:echo")
    expect(nxt).to_have_attribute("data-state", "done")
    assert chat.requests[-1]["body"]["messages"] == [{"role": "user", "content": "And now?"}]


def test_upstream_refusal_before_streaming_is_shown(chat: Chat):
    msg = chat.ask("hello", model="sim:fault=http-429")
    expect(msg).to_have_attribute("data-state", "failed")
    expect(msg.locator(".error")).to_be_visible()
    assert msg.locator(".error").text_content().strip()
    assert msg.locator(".text").text_content() == ""


def test_http_error_before_streaming_is_shown(chat: Chat):
    def reject(route):
        route.fulfill(
            status=429,
            content_type="application/json",
            body=json.dumps({"error": {"type": "rate_limited", "message": "Too many <b>requests</b>"}}),
        )

    chat.page.route("**/api/get-response", reject)
    msg = chat.ask("hello")
    expect(msg).to_have_attribute("data-state", "failed")
    expect(msg.locator(".error")).to_contain_text("rate_limited")
    expect(msg.locator(".error")).to_contain_text("Too many <b>requests</b>")
    expect(msg.locator(".error b")).to_have_count(0)


def test_stream_without_done_is_connection_lost(chat: Chat):
    body = (
        'event: start\r\ndata: {"stream_id":"s1","model":"m"}\r\n\r\n'
        ": ping\r\n\r\n"
        'id: 1\r\ndata: {"text":"partial "}\r\n\r\n'
        'id: 2\ndata: {"text":"answer"}\n\n'
    )
    chat.page.route(
        "**/api/get-response",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    msg = chat.ask("hello")
    # The page asks the server for the rest (GET /api/streams/s1); the server has no such
    # stream, so the answer is shown interrupted with what had arrived, never as complete.
    expect(msg).to_have_attribute("data-state", "interrupted")
    expect(msg.locator(".text")).to_have_text("partial answer")
    expect(msg.locator(".error")).to_contain_text("could not be continued")


def test_sse_parsing_crlf_comments_and_multiline_data(chat: Chat):
    body = (
        "\ufeff: hello\r\n\r\n"
        'event: start\r\ndata: {"stream_id":"s2","model":"mock-model"}\r\n\r\n'
        'id: 1\r\ndata: {"text":\r\ndata: "line one\\n"}\r\n\r\n'
        ": ping\r\n\r\n"
        'id: 2\rdata: {"text":"line two"}\r\r'
        'event: done\ndata: {"finish_reason":"stop","usage":null}\n\n'
    )
    chat.page.route(
        "**/api/get-response",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
    )
    msg = chat.ask("hello")
    expect(msg).to_have_attribute("data-state", "done")
    # The answer is Markdown: its line break is a <br>, read back as a newline.
    assert msg.locator(".text").inner_text() == "line one\nline two"
    expect(msg.locator(".model-tag")).to_have_text("mock-model")
    stats = msg.locator(".stats")
    expect(stats).to_contain_text("first token")
    assert stats.get_attribute("data-token-source") == "deltas"
    assert stats.get_attribute("data-tokens") == "2"


def test_multi_turn_sends_history(chat: Chat):
    first = chat.ask("first question alpha", model="sim:echo")
    expect(first).to_have_attribute("data-state", "done")
    first_answer = first.locator(".text").text_content()
    assert first_answer

    second = chat.ask("second question beta")
    expect(second).to_have_attribute("data-state", "done")

    assert len(chat.requests) == 2
    req1, req2 = (r["body"] for r in chat.requests)
    assert req1 == {"messages": [{"role": "user", "content": "first question alpha"}], "model": "sim:echo"}
    assert req2["model"] == "sim:echo"
    assert req2["messages"] == [
        {"role": "user", "content": "first question alpha"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "second question beta"},
    ]
    assert chat.requests[1]["headers"].get("accept") == "text/event-stream"

    # An empty model field leaves "model" out of the request: the server's
    # default model answers, or the server refuses when it has none.
    info = chat.page.request.get(chat.base_url + "/api/info").json()
    third = chat.ask("third", model="")
    if info["model"]:
        expect(third).to_have_attribute("data-state", "done", timeout=30_000)
    else:
        expect(third).to_have_attribute("data-state", "failed")
        expect(third.locator(".error")).to_contain_text("model")
    assert "model" not in chat.requests[2]["body"]
    assert len(chat.requests[2]["body"]["messages"]) == 5


def test_enter_sends_and_shift_enter_adds_newline(chat: Chat):
    page = chat.page
    page.fill("#model", "sim:echo")
    prompt = page.locator("#prompt")
    prompt.focus()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    expect(prompt).to_have_value("line one\nline two")
    expect(chat.assistants).to_have_count(0)
    assert chat.requests == []

    page.keyboard.press("Enter")
    expect(chat.assistants).to_have_count(1)
    expect(prompt).to_have_value("")
    expect(chat.last).to_have_attribute("data-state", "done")
    assert page.locator("#conversation .msg.user .text").last.text_content() == "line one\nline two"
    assert chat.requests[0]["body"]["messages"][-1]["content"] == "line one\nline two"

    # Enter on an empty prompt sends nothing.
    page.keyboard.press("Enter")
    expect(chat.assistants).to_have_count(1)


def test_keyboard_reaches_controls(chat: Chat):
    page = chat.page
    page.locator("#model").focus()
    seen = []
    for _ in range(6):
        page.keyboard.press("Tab")
        seen.append(page.evaluate("document.activeElement.id"))
    assert "prompt" in seen and "send" in seen

    # While streaming, Stop is reachable by keyboard too.
    chat.ask("go", model="sim:tps=5,tokens=200")
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#prompt").focus()
    for _ in range(4):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "stop":
            break
    else:
        raise AssertionError("Tab never reached the Stop button")
    page.keyboard.press("Enter")
    expect(chat.last).to_have_attribute("data-state", "stopped")

    # Escape in the message box stops an answer as well.
    chat.ask("again", model="sim:tps=5,tokens=200")
    expect(chat.last.locator(".text")).not_to_have_text("")
    page.locator("#prompt").press("Escape")
    expect(chat.last).to_have_attribute("data-state", "stopped")


def test_screenshot_after_completed_answer(chat: Chat, browser, relay_server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if not chat.page.input_value("#model"):  # no default model on the server
        chat.page.fill("#model", "sim")
    msg = chat.ask("What is tokenrelay?")  # model prefilled from /api/info
    expect(msg).to_have_attribute("data-state", "done", timeout=60_000)
    expect(msg.locator(".stats")).to_be_visible()
    msg2 = chat.ask("Show me some markup: <b>bold?</b>", model="sim:echo")
    expect(msg2).to_have_attribute("data-state", "done")
    chat.page.screenshot(path=str(ARTIFACTS / "chat.png"))
    assert (ARTIFACTS / "chat.png").stat().st_size > 1000

    # Phone-sized screen: no horizontal scrolling, controls still visible.
    ctx = browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True)
    try:
        phone = Chat(ctx.new_page(), relay_server.url).open()
        m = phone.ask("Hello from a phone", model="sim:echo")
        expect(m).to_have_attribute("data-state", "done")
        overflow = phone.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"page scrolls horizontally by {overflow}px on a phone"
        for sel in ("#prompt", "#send", "#stop", "#model", "#upstream"):
            expect(phone.page.locator(sel)).to_be_in_viewport()
        phone.page.screenshot(path=str(ARTIFACTS / "chat-phone.png"))
        assert phone.page_errors == []
    finally:
        ctx.close()
