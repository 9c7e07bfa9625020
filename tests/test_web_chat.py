"""The chat page as people use it, in real headless Chromium against a real ``tokenrelay serve``:
Markdown rendered while it streams (and nothing in an answer ever runs), code blocks and
answers copied, Retry, a conversation that survives a reload (an answer streaming at the
reload goes on from where it was), history kept under the server's body limit, keyboard
shortcuts, the page's security headers with no CSP violation, screenshots and an axe-core scan.

The answers come from ``sim:echo`` models: the answer is the question, word by word, so each
test writes the Markdown it wants to see rendered."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect
from test_web import ARTIFACTS, Chat, snapshot, wait_until

NODE_DIR = Path(__file__).parent / "node"
WORDS = re.compile(r"\s*\S+|\s+")  # how sim:echo splits its answer into deltas

# Recorded in every page before its own scripts: CSP violations, and whether anything ran.
WATCH = """
window.__cspViolations = [];
document.addEventListener('securitypolicyviolation',
    (e) => window.__cspViolations.push(e.violatedDirective + ' ' + e.blockedURI));
"""

MARKDOWN = """## Streaming heading

A paragraph with **bold text**, *emphasis* and `inline code`.

- first item
- second item

1. one
2. two

> a quoted line

See [the docs](https://example.com/docs) for more.

| name | value |
| --- | --- |
| alpha | 1 |
| beta | 2 |

```python
def hello():
    return "world"
```

And a closing paragraph that keeps the answer streaming for a little while longer so every
construct above is already on the page before the answer ends with this last sentence here.
"""

CONSTRUCTS = {
    "heading": ".md h4",
    "strong": ".md p strong",
    "em": ".md p em",
    "inline_code": ".md p > code",
    "list": ".md ul > li",
    "ordered_list": ".md ol > li",
    "blockquote": ".md blockquote",
    "link": ".md a[href]",
    "table_header": ".md table thead th",
    "table_cell": ".md table tbody td",
    "code_block": ".md .code-block pre code",
}

XSS_ANSWER = """<script>window.__pwned = 'script'</script>

<img src=x onerror="window.__pwned = 'img'">

[click me](javascript:window.__pwned='link')

[data link](data:text/html,<script>parent.__pwned='data'</script>)

![pixel](javascript:window.__pwned='image')

<a href="javascript:window.__pwned='raw-a'">raw anchor</a>

**<svg onload="window.__pwned='svg'"></svg>**

<iframe srcdoc="<script>parent.__pwned='iframe'</script>"></iframe>

[fine](https://example.com/ok)
"""


def new_chat(browser: Browser, url: str, **context_args) -> Chat:
    args = {"viewport": {"width": 1000, "height": 760}, **context_args}
    context = browser.new_context(**args)
    context.add_init_script(WATCH)
    return Chat(context.new_page(), url).open()


@pytest.fixture()
def open_chat(browser: Browser, relay_server) -> Iterator:
    opened: list[Chat] = []

    def open_(url: str | None = None, **context_args) -> Chat:
        chat = new_chat(browser, url or relay_server.url, **context_args)
        opened.append(chat)
        return chat

    yield open_
    try:
        for chat in opened:
            assert chat.page_errors == [], f"uncaught errors in the page: {chat.page_errors}"
            assert chat.page.evaluate("window.__cspViolations") == []
    finally:
        for chat in opened:
            chat.page.context.close()


def echo(tps: int | str = 0, **extra: object) -> str:
    options = ",".join([f"tps={tps}", "ttft=0"] + [f"{k}={v}" for k, v in extra.items()])
    return "sim:echo," + options


def wait_done(msg, timeout: float = 30_000) -> None:
    expect(msg).to_have_attribute("data-state", "done", timeout=timeout)


def token_index(text: str, needle: str) -> int:
    """The index of the echo delta that carries ``needle``."""
    return next(i for i, t in enumerate(WORDS.findall(text)) if needle in t)


# ---------------------------------------------------------------------------
# headers and static files
# ---------------------------------------------------------------------------


def test_page_headers_favicon_and_body_limit(relay_server) -> None:
    page = httpx.get(relay_server.url + "/", timeout=5)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    directives = dict((d.strip().split(" ", 1) + [""])[:2] for d in csp.split(";"))
    assert directives["script-src"] == "'self'", csp
    assert "unsafe-inline" not in directives["script-src"] and "unsafe-eval" not in csp
    assert directives["frame-ancestors"] == "'none'"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"

    icon = httpx.get(relay_server.url + "/favicon.ico", timeout=5)
    assert icon.status_code == 200 and icon.headers["content-type"].startswith("image/svg+xml")
    assert icon.content.lstrip().startswith(b"<svg")

    for path in ("/static/app.js", "/static/vendor/smd.min.js"):
        res = httpx.get(relay_server.url + path, timeout=5)
        assert res.status_code == 200, path
        assert "javascript" in res.headers["content-type"], (path, res.headers["content-type"])
        assert res.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(relay_server.url + "/static/vendor/smd.LICENSE", timeout=5).status_code == 200

    info = httpx.get(relay_server.url + "/api/info", timeout=5).json()
    assert info["max_body_bytes"] == 1024 * 1024


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def test_each_markdown_construct_appears_while_streaming(open_chat) -> None:
    chat = open_chat()
    msg = chat.ask(MARKDOWN, model=echo(tps=40))
    # Polled every frame in the page: when each construct first showed, and in which state.
    seen = chat.page.evaluate(
        """async (constructs) => {
            const seen = {};
            const msgs = document.querySelectorAll('#conversation .msg.assistant');
            const m = msgs[msgs.length - 1];
            for (;;) {
                const state = m.dataset.state;
                for (const [name, sel] of Object.entries(constructs)) {
                    if (!(name in seen) && m.querySelector(sel)) seen[name] = state;
                }
                if (state !== 'streaming') return seen;
                await new Promise((r) => requestAnimationFrame(r));
            }
        }""",
        CONSTRUCTS,
    )
    assert seen == {name: "streaming" for name in CONSTRUCTS}, seen
    wait_done(msg)
    md = msg.locator(".md")
    expect(md.locator("h4")).to_have_text("Streaming heading")
    expect(md.locator("strong")).to_have_text("bold text")
    expect(md.locator("p > code")).to_have_text("inline code")
    expect(md.locator("ul > li")).to_have_count(2)
    expect(md.locator("ol > li")).to_have_text(["one", "two"])
    link = md.locator("a", has_text="the docs")
    expect(link).to_have_attribute("href", "https://example.com/docs")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    expect(md.locator("tbody tr")).to_have_count(2)
    expect(md.locator("thead th")).to_have_text(["name", "value"])
    block = md.locator(".code-block")
    expect(block.locator(".code-lang")).to_have_text("python")
    assert block.locator("code").text_content() == 'def hello():\n    return "world"'
    assert block.locator("pre").evaluate("e => getComputedStyle(e).overflowX") == "auto"
    assert "monospace" in block.locator("code").evaluate("e => getComputedStyle(e).fontFamily")


@pytest.mark.parametrize(("needle", "check"), [
    ("beta", "table"),
    ('"world"', "fence"),
])
def test_open_table_or_fence_renders_before_it_closes(open_chat, sim_server, needle: str, check: str) -> None:
    """The answer stalls inside a table or a code fence: what arrived is already rendered right."""
    chat = open_chat()
    at = token_index(MARKDOWN, needle) + 1
    msg = chat.ask(MARKDOWN, model=echo(tps=0, fault="stall", at=at, stall=30))
    md = msg.locator(".md")
    if check == "table":
        expect(md.locator("tbody td").first).to_have_text("alpha")
        expect(md.locator("tbody tr")).to_have_count(2)
        expect(md.locator(".code-block")).to_have_count(0)
    else:
        expect(md.locator(".code-block code")).to_contain_text('return "world')
        expect(md.locator(".code-block .code-lang")).to_have_text("python")
        expect(md.locator("p", has_text="closing paragraph")).to_have_count(0)
    expect(msg).to_have_attribute("data-state", "streaming")
    chat.page.click("#stop")
    expect(msg).to_have_attribute("data-state", "stopped")


def test_nothing_in_an_answer_runs(open_chat) -> None:
    chat = open_chat()
    msg = chat.ask(XSS_ANSWER, model=echo())
    wait_done(msg)
    page = chat.page
    conversation = page.locator("#conversation")
    for tag in ("script", "img", "iframe", "svg", "object", "embed"):
        expect(conversation.locator(tag)).to_have_count(0)
    # Shown as text (Markdown still reads __x__ as bold, so the flag may lose its underscores).
    text = msg.locator(".md").text_content()
    assert "<script>window." in text and "</script>" in text
    assert "<img src=x onerror=" in text
    assert "<iframe srcdoc=" in text
    hrefs = msg.locator(".md a").evaluate_all("as => as.map((a) => a.getAttribute('href'))")
    assert [h for h in hrefs if h] == ["https://example.com/ok"], hrefs
    # Clicking what looks like a link runs nothing either.
    for label in ("click me", "data link", "pixel"):
        msg.locator(".md a", has_text=label).click()
    expect(msg.locator(".md a.unsafe-link")).to_have_count(3)
    page.evaluate(
        """() => new Promise((resolve) => {
            const probe = new Image();
            probe.onerror = probe.onload = () => resolve(true);
            probe.src = 'x?probe=' + Date.now();
        })"""
    )
    assert page.evaluate("[window.__pwned, window.pwned]") == [None, None]
    assert chat.dialogs == []


# ---------------------------------------------------------------------------
# per answer: copy, retry; history
# ---------------------------------------------------------------------------


def test_copy_answer_and_code_block(open_chat, relay_server) -> None:
    chat = open_chat(permissions=["clipboard-read", "clipboard-write"])
    source = "Some **Markdown** here.\n\n```sh\necho hi\n```\n\nDone."
    msg = chat.ask(source, model=echo())
    wait_done(msg)
    page = chat.page
    msg.locator(".answer-copy").click()
    expect(msg.locator(".answer-copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == source
    msg.locator(".code-copy").click()
    expect(msg.locator(".code-copy")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "echo hi"


def test_retry_a_failed_answer_asks_again(open_chat) -> None:
    chat = open_chat()
    wait_done(chat.ask("first question", model=echo()))
    first = chat.assistants.first
    expect(first.locator(".answer-retry")).to_be_visible()
    chat.ask("please answer this", model="sim:fault=error-mid")
    failed = chat.assistants.nth(1)
    expect(failed).to_have_attribute("data-state", "failed")
    # Only the last answer offers Retry; a failed one says it is not sent with later questions.
    expect(first.locator(".answer-retry")).to_be_hidden()
    expect(failed.locator(".note")).to_contain_text("Not sent with later questions")
    expect(failed.locator(".answer-retry")).to_be_visible()

    chat.page.fill("#model", echo())
    failed.locator(".answer-retry").click()
    expect(chat.assistants).to_have_count(2)
    wait_done(chat.last)
    expect(chat.last.locator(".md")).to_have_text("please answer this")
    assert len(chat.requests) == 3
    assert chat.requests[-1]["body"]["messages"] == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first question"},
        {"role": "user", "content": "please answer this"},
    ]
    expect(chat.page.locator("#conversation .msg.user")).to_have_count(2)


def test_history_is_trimmed_under_the_body_limit(browser, start_relay, sim_server) -> None:
    limit = 3000
    relay = start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_MAX_BODY_BYTES=str(limit))
    chat = new_chat(browser, relay.url)
    try:
        for i in range(4):
            msg = chat.ask(f"question {i} " + "words " * 150, model=echo())
            wait_done(msg)
        sizes = [len(json.dumps(r["body"], separators=(",", ":")).encode()) for r in chat.requests]
        assert all(size <= limit for size in sizes), sizes
        last = chat.requests[-1]["body"]["messages"]
        assert last[-1]["content"].startswith("question 3")
        assert len(last) < 7, "older turns must have been left out"
        assert last[0]["content"].startswith(f"question {3 - len(last) // 2}")
        note = chat.last.locator(".note")
        expect(note).to_be_visible()
        expect(note).to_contain_text("left out of this question to stay under the server's request limit")

        # A single question larger than the limit is refused on the page, saying why.
        too_big = chat.ask("x" * (limit + 10), model=echo())
        expect(too_big).to_have_attribute("data-state", "failed")
        expect(too_big.locator(".error")).to_contain_text("request_too_large")
        assert len(chat.requests) == 4
        assert chat.page_errors == []
    finally:
        chat.page.context.close()


def test_settings_send_system_prompt_and_temperature(open_chat) -> None:
    chat = open_chat()
    page = chat.page
    page.click("#settings summary")
    page.fill("#system", "Answer in French.")
    page.fill("#temperature", "0.3")
    wait_done(chat.ask("bonjour", model=echo()))
    body = chat.requests[-1]["body"]
    assert body["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert body["temperature"] == 0.3
    # Kept for the next visit.
    page.reload()
    expect(page.locator("#system")).to_have_value("Answer in French.")
    expect(page.locator("#temperature")).to_have_value("0.3")


# ---------------------------------------------------------------------------
# the conversation across reloads
# ---------------------------------------------------------------------------


def test_reload_keeps_the_conversation_and_earlier_chats(open_chat) -> None:
    chat = open_chat()
    page = chat.page
    wait_done(chat.ask("first **chat** question", model=echo()))
    wait_done(chat.ask("second question", model=echo()))
    page.reload()
    expect(page.locator("#conversation .msg.user")).to_have_count(2)
    expect(chat.assistants.first.locator(".md strong")).to_have_text("chat")
    expect(chat.assistants.first).to_have_attribute("data-state", "done")

    # The history of a restored chat is sent with the next question.
    wait_done(chat.ask("third", model=echo()))
    assert len(chat.requests[-1]["body"]["messages"]) == 5

    page.click("#new-chat")
    expect(page.locator("#conversation .msg")).to_have_count(0)
    expect(page.locator("#empty-hint")).to_be_visible()
    wait_done(chat.ask("another chat", model=echo()))
    assert chat.requests[-1]["body"]["messages"] == [{"role": "user", "content": "another chat"}]

    page.click("#chats summary")
    links = page.locator("#chat-list .chat-link")
    expect(links).to_have_count(2)
    expect(links.first).to_have_text("another chat")
    links.nth(1).click()
    expect(page.locator("#conversation .msg.user")).to_have_count(3)
    expect(page.locator("#conversation .msg.user").first).to_have_text("You" + "first **chat** question")


def test_reload_mid_answer_continues_without_duplicates(open_chat) -> None:
    chat = open_chat()
    page = chat.page
    words = " ".join(f"w{i:02d}" for i in range(60))
    msg = chat.ask(words, model=echo(tps=15))
    wait_until(lambda: len((snapshot(page) or {}).get("text", "")) > 30, what="part of the answer")
    resumes: list[dict] = []
    page.on("request", lambda r: resumes.append(r.headers) if "/api/streams/" in r.url and r.method == "GET" else None)
    page.reload()
    expect(page.locator("#upstream")).not_to_have_attribute("data-simulated", "unknown")
    msg = chat.last
    expect(msg).to_have_attribute("data-state", "streaming")
    wait_done(msg)
    assert msg.locator(".md").text_content() == words
    assert len(resumes) == 1 and int(resumes[0]["last-event-id"]) > 0, resumes
    expect(msg.locator(".stats")).to_contain_text("continued after a reload")
    # The answer is whole in storage too: the next question carries it as history.
    wait_done(chat.ask("next", model=echo()))
    assert chat.requests[-1]["body"]["messages"][1] == {"role": "assistant", "content": words}


def test_stop_after_reload_stops_the_model(open_chat, sim_server) -> None:
    chat = open_chat()
    page = chat.page
    before = sim_server.wait_idle(timeout=5)
    msg = chat.ask("Write a very long story.", model="sim:tps=5,tokens=400")
    expect(msg.locator(".md")).not_to_have_text("")
    page.reload()
    msg = chat.last
    expect(msg).to_have_attribute("data-state", "streaming")
    expect(page.locator("#stop")).to_be_enabled()
    page.locator("#prompt").press("Escape")
    expect(msg).to_have_attribute("data-state", "stopped")
    after = sim_server.wait_idle(timeout=5)
    assert after["cancelled_streams"] > before["cancelled_streams"]


def test_expired_stream_is_shown_interrupted_with_retry(open_chat) -> None:
    chat = open_chat()
    page = chat.page
    wait_done(chat.ask("what was asked", model=echo()))
    # As if the page had been closed mid-answer longer ago than the server keeps streams.
    page.evaluate(
        """() => {
            const id = localStorage.getItem('tokenrelay.currentChat');
            const c = JSON.parse(localStorage.getItem('tokenrelay.chat.' + id));
            const a = c.turns[1];
            Object.assign(a, {state: 'streaming', content: 'half an', streamId: 'gone', lastEventId: '2', stats: null});
            localStorage.setItem('tokenrelay.chat.' + id, JSON.stringify(c));
        }"""
    )
    page.reload()
    msg = chat.last
    expect(msg).to_have_attribute("data-state", "interrupted")
    expect(msg.locator(".badge")).to_have_text("INTERRUPTED")
    expect(msg.locator(".md")).to_have_text("half an")
    expect(msg.locator(".error")).to_contain_text("could not be continued")
    msg.locator(".answer-retry").click()
    wait_done(chat.last)
    expect(chat.last.locator(".md")).to_have_text("what was asked")
    expect(chat.assistants).to_have_count(1)


# ---------------------------------------------------------------------------
# keyboard
# ---------------------------------------------------------------------------


def test_keyboard_edit_last_question_focus_and_help(open_chat) -> None:
    chat = open_chat()
    page = chat.page
    page.fill("#model", echo())
    page.fill("#prompt", "what is 2+2")
    page.click("#send")
    expect(page.locator("#prompt")).to_be_focused()
    wait_done(chat.last)

    page.keyboard.press("ArrowUp")
    expect(page.locator("#prompt")).to_have_value("what is 2+2")
    expect(page.locator("#edit-note")).to_be_visible()
    page.keyboard.press("End")
    page.keyboard.type(" and 3+3")
    page.keyboard.press("Enter")
    expect(chat.assistants).to_have_count(1)
    wait_done(chat.last)
    expect(chat.last.locator(".md")).to_have_text("what is 2+2 and 3+3")
    expect(page.locator("#edit-note")).to_be_hidden()
    assert chat.requests[-1]["body"]["messages"] == [{"role": "user", "content": "what is 2+2 and 3+3"}]

    # Escape cancels an edit.
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Escape")
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#edit-note")).to_be_hidden()

    page.click("#help-button")
    help_ = page.locator("#help")
    expect(help_).to_be_visible()
    expect(help_).to_contain_text("Shift")
    expect(help_).to_contain_text("Edit your last question")
    page.keyboard.press("Escape")
    expect(help_).to_be_hidden()


# ---------------------------------------------------------------------------
# looks, accessibility, cost per chunk
# ---------------------------------------------------------------------------

SHOWCASE = """Here is a **short** answer with a list, a table and code:

- one `item`
- [a link](https://example.com)

| col | value |
| --- | --- |
| a | 1 |

```js
const answer = 42; // a long line that has to scroll horizontally on a narrow phone screen, really
```
"""


@pytest.fixture(scope="module")
def axe_source() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the accessibility scan needs axe-core from npm (tests/node)"
    path = NODE_DIR / "node_modules" / "axe-core" / "axe.min.js"
    if not path.is_file():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True,
                       timeout=300)
    return path.read_text()


@pytest.mark.parametrize(("name", "context_args"), [
    ("light", {"color_scheme": "light"}),
    ("dark", {"color_scheme": "dark"}),
    ("390x844", {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True}),
])
def test_screenshots_and_accessibility(open_chat, axe_source: str, name: str, context_args: dict) -> None:
    # The scan's script is injected by the test: let it past the page's CSP (the page's own
    # scripts are checked under CSP everywhere else).
    chat = open_chat(bypass_csp=True, **context_args)
    page = chat.page
    wait_done(chat.ask("Show me something", model=echo()))
    wait_done(chat.ask(SHOWCASE, model=echo()))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"chat-{name}.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 1000
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px"

    page.add_script_tag(content=axe_source)
    results = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    serious = [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["html"][:120] for n in v["nodes"][:3]]}
        for v in results["violations"] if v["impact"] in ("serious", "critical")
    ]
    assert serious == [], json.dumps(serious, indent=1)


def test_markdown_cost_per_chunk_stays_flat(open_chat) -> None:
    """A 30,000-character answer fed in 6-character deltas, 16 per frame (a fast model), a
    layout after each frame as the page gets: the parse and DOM cost of a delta near the end
    is about what it was at the start (nothing already shown is parsed again). The figures go
    to tests/artifacts/markdown-cost.json."""
    chat = open_chat()
    result = chat.page.evaluate(
        """() => {
            const block = [
                '## Section\\n\\n',
                'Some **bold** and *emphasis* and `code` in a paragraph of ordinary words. ',
                'More words follow here to make the paragraph long enough to wrap a line.\\n\\n',
                '- item one\\n- item [two](https://example.com)\\n\\n',
                '| a | b |\\n| --- | --- |\\n| 1 | 2 |\\n\\n',
                '```py\\nprint("hello")\\nx = 1\\n```\\n\\n',
            ].join('');
            let text = '';
            while (text.length < 30000) text += block;
            text = text.slice(0, 30000);
            const host = document.createElement('div');
            host.className = 'text md';
            document.querySelector('#conversation').append(host);
            const md = window.tokenrelay.createMarkdown(host);
            const chunks = [];
            for (let i = 0; i < text.length; i += 6) chunks.push(text.slice(i, i + 6));
            const frame = 16, tenths = 10, per = Math.floor(chunks.length / tenths);
            const write = [], layout = [];
            for (let w = 0; w < tenths; w++) {
                let tw = 0, tl = 0, frames = 0;
                for (let i = w * per; i < (w + 1) * per; i += frame) {
                    const t0 = performance.now();
                    for (let j = i; j < Math.min(i + frame, (w + 1) * per); j++) md.write(chunks[j]);
                    const t1 = performance.now();
                    host.offsetHeight;
                    tl += performance.now() - t1;
                    tw += t1 - t0;
                    frames++;
                }
                write.push(tw / per * 1000);
                layout.push(tl / frames * 1000);
            }
            md.end();
            return {chars: text.length, deltas: chunks.length, writeMicrosPerDelta: write,
                    layoutMicrosPerFrame: layout, rendered: host.textContent.length};
        }"""
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "markdown-cost.json").write_text(json.dumps(result, indent=1))
    write, layout = result["writeMicrosPerDelta"], result["layoutMicrosPerFrame"]
    print(f"markdown, by tenth of a 30,000-character answer: µs per delta {[round(c) for c in write]}; "
          f"µs of layout per frame {[round(c) for c in layout]}")
    assert result["rendered"] > 20000
    # Medians of three tenths: the machine is shared, single tenths are noisy. A re-parse of the
    # answer so far per delta would make the last tenths 10-20 times the first.
    first, last = statistics.median(write[:3]), statistics.median(write[-3:])
    assert last < 4 * first + 50, write
    # Layout happens once per frame whatever the number of deltas; it grows with the answer's
    # size (a few ms near 30,000 characters on a shared 2-core machine), never per delta.
    assert statistics.median(layout[-3:]) < 50_000, layout
