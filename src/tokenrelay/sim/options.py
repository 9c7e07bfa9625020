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

Every number has bounds (``LIMITS``), so a model name cannot make one request cost the
process seconds of CPU or hundreds of megabytes; a value outside them is a 422 that says them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from ..errors import ValidationFailed

MODELS = ("sim", "sim:echo", "sim:tools")
"""The simulator's models, as ``GET /v1/models`` lists them (options are not listed)."""

FAULTS = ("error-before", "error-mid", "stall", "malformed")

LIMITS: dict[str, tuple[float, float]] = {
    "ttft": (0, 60),
    "tps": (0, 1_000_000),
    "stall": (0, 600),
    "tokens": (0, 50_000),
    "at": (0, 50_000),
    "tools": (0, 16),
    "seed": (0, 2**32 - 1),
}
"""The range of each per-request option (inclusive). ``tokens``: an unpaced answer of 50,000
tokens is about 300 kB of text; ``tools``: each call is streamed in fragments of its own."""


def describe_limits() -> str:
    return ", ".join(f"{key} {_num(lo)}–{_num(hi)}" for key, (lo, hi) in LIMITS.items())


def _num(x: float) -> str:
    return f"{int(x):,}" if x == int(x) else f"{x:g}"


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
            value_set = changes.get(key)
            if key in LIMITS and isinstance(value_set, (int, float)):
                lo, hi = LIMITS[key]
                if not (math.isfinite(value_set) and lo <= value_set <= hi):
                    raise ValidationFailed(
                        f"model: simulator option {item!r} in {model!r} is out of range: {key} is {_num(lo)} to "
                        f"{_num(hi)} (bounds: {describe_limits()}; see 'tokenrelay sim --help')"
                    )
        return replace(self, **changes)  # type: ignore[arg-type]
