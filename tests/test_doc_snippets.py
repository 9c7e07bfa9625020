"""Every Python snippet in the README and docs/ runs as written: against a real
``tokenrelay serve`` where it talks to one (its ``http://127.0.0.1:8000`` pointed at the
test's relay), and with the names it leaves to the reader (``already_seen``, ``store``)
filled in. A snippet that forgets an import fails here, not for the reader."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
from servers import RelayServer

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_SERVER = "http://127.0.0.1:8000"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def snippets() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
            line = text[:match.start()].count("\n") + 1
            found.append((f"{path.relative_to(ROOT)}:{line}", match.group(1)))
    return found


SNIPPETS = snippets()


def test_the_docs_have_python_snippets() -> None:
    assert any(name.startswith("README.md") for name, _ in SNIPPETS)
    assert any(name.startswith("docs/jobs.md") for name, _ in SNIPPETS)


@pytest.mark.parametrize("name,code", SNIPPETS, ids=[name for name, _ in SNIPPETS])
def test_python_snippet_runs(name: str, code: str, relay_server: RelayServer,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    stored: list[tuple[Any, ...]] = []
    namespace: dict[str, Any] = {
        "__name__": "snippet",
        # left to the reader: their own store of seen ids and answers
        "already_seen": lambda webhook_id: False,
        "store": lambda *args: stored.append(args),
    }
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(README_SERVER, relay_server.url), name, "exec"), namespace)
    if "receive" in namespace:  # a webhook receiver: a signed delivery is taken, a forged one refused
        from datetime import datetime, timezone

        from standardwebhooks.webhooks import Webhook

        body = b'{"type":"job.succeeded","data":{"id":"job_1","result":{"text":"hi"}}}'
        now = datetime.now(timezone.utc)
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": Webhook(SECRET).sign("msg_1", now, body.decode())}
        assert namespace["receive"](body, headers) == 204
        assert stored == [("job.succeeded", "job_1", {"text": "hi"})]
        assert namespace["receive"](body, {**headers, "webhook-signature": "v1,AAAA"}) == 401
    elif README_SERVER in code:
        assert out.getvalue().strip(), f"{name} printed nothing"
