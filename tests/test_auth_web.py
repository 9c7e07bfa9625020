"""The chat page on a server that requires a client key: it asks for one, keeps it in the
tab's sessionStorage and sends it as ``Authorization: Bearer``. Real headless Chromium."""

from __future__ import annotations

import secrets

from playwright.sync_api import expect
from test_web import Chat


def test_page_asks_for_the_key_and_sends_it(browser, start_relay, sim_server) -> None:
    key = "tr-" + secrets.token_urlsafe(12)
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_API_KEYS=key)
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    try:
        chat = Chat(context.new_page(), relay.url).open()
        page = chat.page
        expect(page.locator("#api-key")).to_be_visible()

        refused = chat.ask("no key yet", model="sim:echo")
        expect(refused).to_have_attribute("data-state", "failed")
        expect(refused).to_contain_text("client key")
        expect(page.locator("#api-key")).to_be_focused()
        assert "authorization" not in chat.requests[-1]["headers"]

        page.fill("#api-key", key)
        answered = chat.ask("with the key", model="sim:echo")
        expect(answered).to_have_attribute("data-state", "done")
        expect(answered.locator(".text")).to_have_text("with the key")
        assert chat.requests[-1]["headers"]["authorization"] == f"Bearer {key}"

        # Kept for this tab: a reload does not ask again.
        page.reload()
        expect(page.locator("#upstream")).not_to_have_attribute("data-simulated", "unknown")
        expect(page.locator("#api-key")).to_have_value(key)
        again = chat.ask("after reload", model="sim:echo")
        expect(again).to_have_attribute("data-state", "done")
        assert chat.page_errors == []
    finally:
        context.close()


def test_no_key_field_when_none_is_needed(browser, relay_server) -> None:
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    try:
        chat = Chat(context.new_page(), relay_server.url).open()
        expect(chat.page.locator("#api-key")).to_be_hidden()
        msg = chat.ask("open server", model="sim:echo")
        expect(msg).to_have_attribute("data-state", "done")
        assert "authorization" not in chat.requests[-1]["headers"]
    finally:
        context.close()
