"""Upstream providers: where answers come from (see ``base.Provider``)."""

from __future__ import annotations

from ..config import Settings
from .base import Delta, Provider, Usage
from .openai_compat import OpenAICompatible, make_client
from .simulator import SimOptions, Simulator

__all__ = ["Delta", "Provider", "Usage", "make_provider", "sim_defaults"]


def sim_defaults(settings: Settings) -> SimOptions:
    return SimOptions(
        ttft=settings.sim_ttft, tps=settings.sim_tps, tokens=settings.sim_tokens, seed=settings.sim_seed
    )


def make_provider(settings: Settings) -> Provider:
    if settings.upstream_url is None:
        return Simulator(sim_defaults(settings))
    key = settings.upstream_key.get_secret_value() if settings.upstream_key else None
    return OpenAICompatible(
        base_url=settings.upstream_url, api_key=key, client=make_client(settings), label=settings.upstream_label
    )
