"""Upstream providers: where answers come from (see ``base.Provider``). ``routing.Router``
builds them from the settings, for every process alike."""

from __future__ import annotations

from .base import Delta, OpenAIRequest, Passthrough, Provider, Usage

__all__ = ["Delta", "OpenAIRequest", "Passthrough", "Provider", "Usage"]
