"""The simulator's options. Per-request options ride in the model name, so they pass through any client and relay::

    sim                          the defaults
    sim:echo                     repeat the last user message
    sim:ttft=2,tps=10,tokens=50  pacing and length (tps=0: no delay)
    sim:seed=7                   another deterministic answer
    sim:fault=error-mid          error-before | error-mid | stall | malformed | http-429 | http-500 | http-NNN
    sim:fault=stall,stall=5      go silent for 5 s after ``at`` tokens (default: halfway)
    sim:ttft=0;tps=0             ';' separates options too, for gateways that split model names on ','
    sim:tools                    call a tool (the request's first, or ``get_weather``);
                                 ``tools=2`` calls two; a request with ``tools`` calls one
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ..errors import ValidationFailed

MODELS = ("sim", "sim:echo", "sim:tools")
"""The simulator's models, as ``GET /v1/models`` lists them (options are not listed)."""

FAULTS = ("error-before", "error-mid", "stall", "malformed")


@dataclass(frozen=True, slots=True)
class SimOptions:
    ttft: float = 0.25
    tps: float = 40.0
    tokens: int = 80
    seed: int = 0
    echo: bool = False
    fault: str | None = None
    at: int | None = None
    stall: float = 30.0
    tools: int = 0

    def with_model(self, model: str) -> SimOptions:
        """Apply the options written in a model name such as ``sim:echo,tps=10``."""
        _, _, spec = model.partition(":")
        if not spec:
            return self
        changes: dict[str, object] = {}
        for item in re.split(r"[,;]", spec):
            key, eq, value = item.strip().partition("=")
            try:
                if key == "echo" and not eq:
                    changes["echo"] = True
                elif key == "tools":
                    changes["tools"] = int(value) if eq else 1
                elif key in ("ttft", "tps", "stall"):
                    changes[key] = float(value)
                elif key in ("tokens", "seed", "at"):
                    changes[key] = int(value)
                elif key == "fault" and (value in FAULTS or re.fullmatch(r"http-\d{3}", value)):
                    changes["fault"] = value
                else:
                    raise ValueError
            except ValueError:
                raise ValidationFailed(
                    f"model: unknown simulator option {item!r} in {model!r} (see 'tokenrelay sim --help')"
                ) from None
        return replace(self, **changes)  # type: ignore[arg-type]
