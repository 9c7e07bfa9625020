from __future__ import annotations

import asyncio

import pytest

from tokenrelay.errors import UpstreamError, UpstreamRateLimited, ValidationFailed
from tokenrelay.sim.provider import SimOptions, Simulator
from tokenrelay.schemas import ChatRequest


def run(model: str, content: str = "hello", **request: object) -> str:
    chat = ChatRequest(messages=[{"role": "user", "content": content}], **request)

    async def collect() -> str:
        deltas = await Simulator(SimOptions(ttft=0, tps=0)).open(chat, model=model)
        return "".join([d.text async for d in deltas])

    return asyncio.run(collect())


def test_same_seed_same_answer_other_seed_other_answer() -> None:
    assert run("sim:seed=3") == run("sim:seed=3")
    assert run("sim:seed=3") != run("sim:seed=4")


def test_echo_repeats_the_last_user_message() -> None:
    assert run("sim:echo", "<b>bold</b> ✓") == "<b>bold</b> ✓"


def test_max_tokens_caps_the_answer() -> None:
    assert len(run("sim:tokens=50", max_tokens=5).split()) <= 5


def test_options_are_checked() -> None:
    with pytest.raises(ValidationFailed, match="tpz"):
        SimOptions().with_model("sim:tpz=3")
    with pytest.raises(ValidationFailed, match="fault=nope"):
        SimOptions().with_model("sim:fault=nope")
    assert SimOptions().with_model("sim:echo,ttft=1.5,tokens=3").ttft == 1.5


def test_faults() -> None:
    with pytest.raises(UpstreamRateLimited):
        run("sim:fault=http-429")
    with pytest.raises(UpstreamError, match="mid-stream"):
        run("sim:fault=error-mid")
