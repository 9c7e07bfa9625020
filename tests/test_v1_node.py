"""``/v1`` through the official ``openai`` Node SDK: ``tests/node/v1.mjs`` run by node against
a real ``tokenrelay serve`` in front of the standalone simulator. Its dependencies come from
``tests/node/package-lock.json`` (``scripts/test.sh`` installs them; so does this test when
they are missing)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from servers import RelayServer

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_sdk() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "the Node SDK test needs node and npm (Node 20 or later)"
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, capture_output=True,
                       timeout=300)
    return Path(node)


def test_node_sdk(node_sdk: Path, relay_server: RelayServer) -> None:
    run = subprocess.run([str(node_sdk), "v1.mjs"], cwd=NODE_DIR, capture_output=True, text=True, timeout=120,
                         env={"PATH": str(node_sdk.parent), "TOKENRELAY_V1": relay_server.url + "/v1"})
    assert run.returncode == 0, run.stderr + run.stdout
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary == {"whole": 5, "streamed": 25, "tool_fragments": 7, "errors": "ok",
                       "models": summary["models"]}
    assert summary["models"] >= 2
