"""``Endpoint``: a request → response function as a plain ASGI app, for Starlette's ``Route``.

Starlette wraps a function endpoint in ``request_response``, which wraps ``send`` once more
for exception handling that the app's ``ExceptionMiddleware`` already does for any error
raised before the response starts. A streamed answer sends once per piece for as long as it
lasts, so its routes skip that second wrapper (docs/performance.md).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Protocol

from starlette.requests import Request
from starlette.types import Receive, Scope, Send


class ASGIResponse(Protocol):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None: ...


class Endpoint:
    def __init__(self, func: Callable[[Request], Awaitable[ASGIResponse]]) -> None:
        self.func = func
        functools.update_wrapper(self, func)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.func(Request(scope, receive))
        await response(scope, receive, send)
