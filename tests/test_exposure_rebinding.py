"""DNS rebinding, in real headless Chromium: a page of ``rebind.example``, whose name the
browser now resolves to 127.0.0.1, reaches tokenrelay as its own origin, so no cross-site
check can tell; only the ``Host`` header does. A module of its own: the browser is started
with a resolver rule, and Playwright's sync API allows one running instance per thread."""

from __future__ import annotations

import shutil

from browser import CHROMIUM_ARGS
from playwright.sync_api import sync_playwright
from servers import RelayServer


def test_a_rebound_name_gets_403_not_the_page_or_the_api(start_relay) -> None:
    relay: RelayServer = start_relay(upstream=None)
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is not installed (bash scripts/test.sh installs it)"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.example 127.0.0.1"])
        try:
            page = browser.new_page()
            response = page.goto(f"http://rebind.example:{relay.port}/")
            assert response is not None and response.status == 403
            assert "TOKENRELAY_ALLOWED_HOSTS" in page.content()
            # The attacker's script, running as rebind.example, cannot start an answer either.
            status = page.evaluate("""async () => (await fetch("/api/get-response", {method: "POST",
                body: '{"messages": [{"role": "user", "content": "hi"}], "model": "sim:echo"}'})).status""")
            assert status == 403
            # The same browser on the real name is served.
            assert page.goto(relay.url + "/").status == 200
        finally:
            browser.close()
