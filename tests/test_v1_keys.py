"""Client keys and per-key limits as the official ``openai`` SDK meets them on ``/v1``:
``AuthenticationError`` for a missing or wrong key, ``RateLimitError`` with ``Retry-After``
over a limit, the slot free again once the SDK closes its stream."""

from __future__ import annotations

import secrets

import openai
import pytest
from servers import RelayServer, SimServer, wait_until

USER = [{"role": "user", "content": "hello"}]
SLOW = "sim:ttft=0,tps=5,tokens=400"


@pytest.fixture(scope="module")
def key() -> str:
    return "tr-" + secrets.token_urlsafe(18)


@pytest.fixture(scope="module")
def relay(start_relay, sim_server: SimServer, key: str) -> RelayServer:
    return start_relay(upstream=sim_server.url + "/v1", TOKENRELAY_API_KEYS=key,
                       TOKENRELAY_MAX_CONCURRENT_STREAMS_PER_KEY="1")


def client(relay: RelayServer, key: str) -> openai.OpenAI:
    """Used as a context manager: an unclosed client's pooled socket is a ResourceWarning."""
    return openai.OpenAI(base_url=relay.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_wrong_key_raises_authentication_error(relay: RelayServer) -> None:
    with client(relay, "not-the-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(model="sim:echo", messages=USER)
        assert caught.value.status_code == 401
        assert caught.value.code == "unauthorized"
        assert caught.value.response.headers["www-authenticate"].startswith("Bearer")
        with pytest.raises(openai.AuthenticationError):
            sdk.models.list()


def test_right_key_streams(relay: RelayServer, key: str) -> None:
    with client(relay, key) as sdk:
        answer = sdk.chat.completions.create(model="sim:echo,ttft=0,tps=0", messages=USER)
        assert answer.choices[0].message.content == "hello"
        pieces = [c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
            model="sim:echo,ttft=0,tps=0", messages=USER, stream=True) if c.choices]
        assert "".join(pieces) == "hello"
        assert sdk.models.list().data is not None


def test_open_stream_limit_raises_rate_limit_error(relay: RelayServer, key: str) -> None:
    with client(relay, key) as sdk:
        _limit_then_free(sdk)


def _limit_then_free(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model=SLOW, messages=USER, stream=True)
    chunks = iter(stream)
    next(chunks)
    with pytest.raises(openai.RateLimitError) as caught:
        sdk.chat.completions.create(model="sim:echo,ttft=0,tps=0", messages=USER)
    assert caught.value.code == "rate_limited"
    assert caught.value.response.headers["retry-after"] == "1"
    stream.close()  # the SDK hangs up midway; the relay gives the slot back

    def answered() -> bool:
        try:
            sdk.chat.completions.create(model="sim:echo,ttft=0,tps=0", messages=USER)
        except openai.RateLimitError:
            return False
        return True

    wait_until(answered, timeout=10)
