"""The configured upstreams as people may see them: each one's name, kind, the models it takes
and its URL without credentials — for the ``serve`` banner, the start-up log, ``/api/info``
and ``/readyz``.

Read from the settings alone, so the banner can say where answers come from before the app
(and its router) exists, in the same words the page and the log use afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .config import Settings

SIMULATOR = "simulator"


@dataclass(frozen=True)
class UpstreamView:
    name: str
    kind: str  # openai | anthropic | simulator
    pattern: str  # the models it takes: a name or a glob
    url: str | None  # without credentials or query; None for the built-in simulator

    def describe(self) -> str:
        """``local (openai, http://127.0.0.1:11434/v1)``; the simulator says what it is."""
        if self.kind == SIMULATOR:
            return f"{self.name} (built-in simulator)" if self.name != SIMULATOR else "built-in simulator"
        if self.url is None or self.url == self.name:
            return f"{self.name} ({self.kind})"
        return f"{self.name} ({self.kind}, {self.url})"

    def route_line(self) -> str:
        """``llama* → local (openai, http://…)``; an unnamed route is named by its pattern,
        which is then not said twice: ``gpt-* → openai, https://api.openai.com/v1``."""
        if self.name != self.pattern:
            return f"{self.pattern} → {self.describe()}"
        if self.kind == SIMULATOR:
            return f"{self.pattern} → built-in simulator"
        return f"{self.pattern} → {self.kind}" + (f", {self.url}" if self.url else "")

    def to_dict(self) -> dict[str, str | None]:
        return {"name": self.name, "kind": self.kind, "pattern": self.pattern, "url": self.url}


def public_url(url: str) -> str:
    """The URL as it may be shown: a key can hide in its user info (``https://user:key@…``)
    or its query (``?api-key=…``), so both are dropped."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 address keeps its brackets
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def upstream_views(settings: Settings) -> list[UpstreamView]:
    """Every upstream, in the order the routes are tried; one when no routes are set.

    The names are those the router gives its upstreams (``Upstream.name``)."""
    if settings.routes:
        return [
            UpstreamView(route.label, route.kind, route.pattern, public_url(route.url) if route.url else None)
            for route in settings.routes
        ]
    if settings.upstream_url is None:
        return [UpstreamView(SIMULATOR, SIMULATOR, "*", None)]
    label = public_url(settings.upstream_url)
    return [UpstreamView(settings.upstream_label, "openai", "*", label)]


def upstream_summary(settings: Settings) -> str:
    """One line: ``simulator``, the upstream's URL, or each route's ``route_line``."""
    views = upstream_views(settings)
    if not settings.routes:
        view = views[0]
        return SIMULATOR if view.kind == SIMULATOR else (view.url or view.name)
    return "; ".join(view.route_line() for view in views)


def is_simulated(settings: Settings) -> bool:
    """True when every answer comes from the built-in simulator."""
    return all(view.kind == SIMULATOR for view in upstream_views(settings))
