"""Official OpenAI SDK clients for the ``/v1`` tests: one per server, closed at the end of
the module (an unclosed client's pooled socket would be a ResourceWarning, an error here)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import openai
import pytest

from servers import RelayServer

_clients: dict[str, openai.OpenAI] = {}


def client(relay: RelayServer) -> openai.OpenAI:
    """A sync client for ``relay``'s ``/v1``: no SDK retries, so every try is tokenrelay's."""
    if relay.url not in _clients:
        _clients[relay.url] = openai.OpenAI(base_url=relay.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    return _clients[relay.url]


@pytest.fixture(scope="module", autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.popitem()[1].close()


def events_until(stream: Iterable[Any], sequence_number: int) -> list[Any]:
    """A Responses stream's events up to ``sequence_number``, then its connection is cut."""
    first = []
    for event in stream:
        first.append(event)
        if event.sequence_number == sequence_number:
            break
    stream.close()  # type: ignore[attr-defined]
    return first
