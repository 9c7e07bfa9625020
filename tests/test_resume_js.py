"""The browser snippet in docs/resume.md, run by node against a real relay: it resumes a cut
stream from ``Last-Event-ID`` and gets exactly the rest."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx

from servers import RelayServer
from streams import chat
from test_cancel import open_request
from test_resume import MODEL, dechunk, read_until, sse_events, stream_id_of, texts

DOC = Path(__file__).parent.parent / "docs" / "resume.md"

RUNNER = """
const base = process.env.BASE;
const realFetch = globalThis.fetch;
globalThis.fetch = (url, options) => realFetch(base + url, options);  // the page's fetch is same-origin
%s
const pieces = [];
const last = await resume(process.env.STREAM_ID, Number(process.env.AFTER), (text) => pieces.push(text));
console.log(JSON.stringify({last, text: pieces.join("")}));
"""


def test_the_documented_snippet_resumes_a_cut_stream(relay_server: RelayServer, tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "this test needs node (Node 20 or later)"
    snippet = re.search(r"```js\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert snippet, "docs/resume.md has no js snippet"
    reference = "".join(text for _, text in texts(sse_events(httpx.post(
        relay_server.url + "/api/get-response", json=chat(model=MODEL), headers={"accept": "text/event-stream"},
        timeout=30).content)))

    sock = open_request(relay_server, chat(model=MODEL), accept="text/event-stream", grace=None)
    raw = read_until(sock, b"id: 3\n")
    sock.close()
    first = "".join(text for eid, text in texts(sse_events(dechunk(raw))) if int(eid) <= 3)

    script = tmp_path / "resume.mjs"
    script.write_text(RUNNER % snippet.group(1), encoding="utf-8")
    run = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=60,
                         env={"BASE": relay_server.url, "STREAM_ID": stream_id_of(raw), "AFTER": "3"})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert first + result["text"] == reference
    assert result["last"] > 3
