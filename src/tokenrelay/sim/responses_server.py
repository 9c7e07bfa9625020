"""The simulator speaking OpenAI's Responses API (``POST /v1/responses`` of ``tokenrelay
sim``, served by ``openai_server``), so tokenrelay's passthrough of ``/v1/responses`` is
tested against a real server over loopback. ``tokenrelay sim --chat-only`` leaves it out,
which is how an upstream that serves only chat completions is tested.

Same answers, options and faults as the chat completions face (options ride in the model
name); the request is translated as tokenrelay translates it (``responses_request``) and the
events are tokenrelay's own (``streaming.responses_events``). A failure midway is a
``response.failed`` and an ``error`` event. The simulator keeps nothing: ``background`` and
``previous_response_id`` are refused, as an upstream that cannot honour them would.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from ..errors import UpstreamError, UpstreamProtocolError
from ..providers.base import Delta
from ..responses_request import Unsupported, check_body, echo_fields, to_chat
from ..schemas import ChatRequest, chat_from_openai
from ..streaming.response import Body
from ..streaming.responses_events import ResponseEvents, sse

if TYPE_CHECKING:
    from .openai_server import SimAnswer


def chat_from_responses(body: dict[str, Any]) -> tuple[ChatRequest, dict[str, Any]]:
    """A Responses body as the simulator's ``ChatRequest``, and the fields its Response repeats."""
    checked = check_body(body)
    if checked.background:
        raise Unsupported("background: the simulator keeps no responses", param="background")
    chat = to_chat(body, model=checked.model or "sim", kind="simulator")
    return chat_from_openai(chat), echo_fields(checked)


def events_for(answer: SimAnswer, echo: dict[str, Any]) -> ResponseEvents:
    return ResponseEvents(id="resp_sim" + secrets.token_hex(8), model=answer.model, echo=echo,
                          created_at=answer.created)


async def stream_events(answer: SimAnswer, deltas: AsyncIterator[Delta], echo: dict[str, Any]) -> Body:
    events = events_for(answer, echo)
    answer.headers.append((b"content-type", b"text/event-stream"))
    try:
        yield b"".join(sse(e)[1] for e in events.start())
        async for delta in deltas:
            batch = events.delta(delta)
            if batch:
                yield b"".join(sse(e)[1] for e in batch)
    except UpstreamProtocolError:
        yield b'event: response.output_text.delta\ndata: {"type": \n\n'
        return
    except UpstreamError as exc:
        yield b"".join(sse(e)[1] for e in events.fail(exc))
        return
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    yield b"".join(sse(e)[1] for e in events.complete())
    answer.complete = True


async def whole_response(answer: SimAnswer, deltas: AsyncIterator[Delta], echo: dict[str, Any]) -> Body:
    events = events_for(answer, echo)
    events.start()
    try:
        async for delta in deltas:
            events.delta(delta)
    finally:
        await deltas.aclose()  # type: ignore[attr-defined]
    last = events.complete()[-1]
    answer.headers.append((b"content-type", b"application/json"))
    yield orjson.dumps(last["response"])
    answer.complete = True
