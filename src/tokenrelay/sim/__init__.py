"""The built-in simulator: a stand-in model that answers offline, deterministically.

``provider.Simulator`` implements the same Provider protocol as the real upstreams, so
``tokenrelay serve`` with no upstream runs on it in-process; ``options`` parses the options a
model name carries (``sim:echo,tps=10``); ``openai_server`` (with ``anthropic_server`` for
``/v1/messages``) serves it over HTTP as ``tokenrelay sim``, for tests, demos and the benchmark.
"""

from __future__ import annotations

from .options import MODELS, SimOptions
from .provider import Simulator

__all__ = ["MODELS", "SimOptions", "Simulator"]
