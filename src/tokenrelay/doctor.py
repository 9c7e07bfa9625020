"""``tokenrelay doctor``: does a deployed tokenrelay stream, or does something in between
buffer it?

It asks the probe route (``GET /api/probe``, see ``routes.probe``) for timed ticks through
the given URL, once as plain text and once as SSE, asking as a browser does (compression
accepted), and times the raw bytes as they arrive — before any decompression, since a
proxy that compresses may also be the one that holds the bytes back. Ticks that were sent
spread out but arrive together are buffered. How it decides is written up in
``docs/doctor.md``.

``diagnose()`` returns a ``Report``; ``cli.py`` only prints it (plain words or JSON).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import httpx
import orjson

from . import __version__
from .doctor_resume import ResumeCheck, check_resume
from .doctor_resume import describe as describe_resume
from .providers.sse_decoder import SSEDecoder

Mode = Literal["text", "sse"]

STREAM_ROUTES = ("/api/get-response", "/api/probe", "/v1/", "/api/jobs/{id}/stream", "/api/streams/")
"""Every streamed route (and doctor's probe, which stands in for them), as the advice names
them; the shipped proxy configs cover exactly these (tests/test_proxies.py)."""
NGINX_STREAM_LOCATION = "^/(api/get-response|api/probe|v1/|api/jobs/[^/]+/stream$|api/streams/)"
"""The regex of the nginx ``location`` for the streamed routes, as deploy/nginx ships it."""
CADDY_STREAM_PATHS = "/api/get-response /api/probe /v1/* /api/jobs/*/stream /api/streams/*"
"""Caddy path matchers for the streamed routes, as deploy/caddy ships them."""
READ_TIMEOUT_ADVICE = "180s"
"""The shipped proxies' read timeout: above the model's slowest time to first token and the
app's own upstream read timeout (TOKENRELAY_READ_TIMEOUT, 120 s), so that a stuck model gets
tokenrelay's JSON error rather than the proxy's 504 page. docs/deploy.md says why."""
_ROUTES = ", ".join(STREAM_ROUTES)

BROWSER_HEADERS = {
    "user-agent": (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
        f"Chrome/131.0.0.0 Safari/537.36 tokenrelay-doctor/{__version__}"
    ),
    "accept": "*/*",
    # A probe that does not accept compression misses the commonest buffering: a proxy
    # that compresses holds small pieces back to compress them together.
    "accept-encoding": "gzip, deflate, br",
    "accept-language": "en-US,en;q=0.9",
}

HOP_HEADERS = (
    "server", "via", "x-cache", "x-cache-status", "x-served-by", "cf-ray", "cf-cache-status",
    "x-amz-cf-id", "x-amz-cf-pop", "fly-request-id", "x-vercel-id", "x-vercel-cache", "x-azure-ref",
    "x-envoy-upstream-service-time", "x-kong-proxy-latency", "x-nf-request-id", "x-render-origin-server",
    "akamai-grn", "x-akamai-transformed", "x-proxy-cache",
)

TICKS = 8
INTERVAL = 0.25
BUFFERED_FRACTION = 0.5
"""A stream is buffered when some tick was held back by at least this fraction of the
time the ticks were sent over (see ``docs/doctor.md``)."""

PROXIES = ("nginx", "ingress-nginx", "caddy", "haproxy", "cloudflare", "aws", "generic")


class Unreachable(Exception):
    """No HTTP answer at all: DNS, refused connection, TLS failure, timeout."""


# --------------------------------------------------------------------------- one probe

@dataclass
class Tick:
    seq: int
    sent_t: float
    """Seconds after the probe began, by the server's clock."""
    arrived: float
    """Seconds after the request was sent, by doctor's clock."""


@dataclass
class Probe:
    mode: Mode
    url: str
    status: int | None = None
    http_version: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    content_encoding: str | None = None
    headers_at: float | None = None
    first_byte_at: float | None = None
    ended_at: float | None = None
    raw_bytes: int = 0
    raw_times: list[float] = field(default_factory=list)
    """When each raw (still compressed) chunk arrived, seconds after the request."""
    ticks: list[Tick] = field(default_factory=list)
    expected_ticks: int = 0
    intended_spread: float = 0.0
    complete: bool = False
    error: str | None = None
    decode_note: str | None = None
    body_excerpt: str | None = None

    @property
    def is_tokenrelay(self) -> bool:
        return "x-tokenrelay-probe" in self.headers

    @property
    def sent_spread(self) -> float:
        return self.ticks[-1].sent_t - self.ticks[0].sent_t if len(self.ticks) > 1 else 0.0

    @property
    def arrival_spread(self) -> float:
        return self.ticks[-1].arrived - self.ticks[0].arrived if len(self.ticks) > 1 else 0.0

    @property
    def holdback(self) -> float:
        """The longest a tick waited beyond the quickest one: lag = arrival − send time, so
        clock offset and network latency cancel out."""
        if not self.ticks:
            return 0.0
        lags = [t.arrived - t.sent_t for t in self.ticks]
        return max(lags) - min(lags)

    @property
    def raw_spread(self) -> float:
        return self.raw_times[-1] - self.raw_times[0] if self.raw_times else 0.0

    @property
    def buffered(self) -> bool:
        if self.decode_note is not None:
            # Undecodable body: the raw chunks' spread against the ticks' intended spread.
            return self.complete and self.raw_spread < BUFFERED_FRACTION * self.intended_spread
        return len(self.ticks) > 1 and self.holdback >= BUFFERED_FRACTION * self.sent_spread > 0

    @property
    def verdict(self) -> str:
        if self.status != 200 or not self.is_tokenrelay:
            return "no_probe"
        if self.buffered:
            return "buffered"
        if not self.complete:
            return "incomplete"
        return "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "url": self.url,
            "verdict": self.verdict,
            "status": self.status,
            "http_version": self.http_version,
            "content_encoding": self.content_encoding,
            "headers_s": _round(self.headers_at),
            "first_byte_s": _round(self.first_byte_at),
            "ticks_expected": self.expected_ticks,
            "ticks_received": len(self.ticks),
            "sent_spread_s": _round(self.sent_spread),
            "arrival_spread_s": _round(self.arrival_spread),
            "holdback_s": _round(self.holdback),
            "complete": self.complete,
            "raw_chunks": len(self.raw_times),
            "raw_bytes": self.raw_bytes,
            "arrivals_s": [_round(t.arrived) for t in self.ticks],
            "raw_arrivals_s": [_round(t) for t in self.raw_times],
            "error": self.error,
            "decode_note": self.decode_note,
        }


@dataclass
class IdleProbe:
    """A stream that stays silent for ``seconds`` before its last tick."""

    url: str
    seconds: float
    status: int | None = None
    cut: bool = False
    cut_after: float | None = None
    """Seconds of silence before the stream ended early (or the proxy answered an error)."""
    ticks: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "silence_s": self.seconds, "status": self.status, "cut": self.cut,
                "cut_after_s": _round(self.cut_after), "ticks_received": self.ticks, "error": self.error}


class _Decoder:
    """Undo Content-Encoding piece by piece, to see which ticks a raw chunk completed."""

    def __init__(self, encoding: str | None) -> None:
        enc = (encoding or "identity").strip().lower()
        self.decompress: Callable[[bytes], bytes] | None
        self.note: str | None = None
        if enc in ("identity", ""):
            self.decompress = lambda data: data
        elif enc in ("gzip", "x-gzip"):
            self.decompress = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress
        elif enc == "deflate":
            self._deflate: Any = None
            self._head = b""
            self.decompress = self._inflate
        elif enc == "br":
            try:
                import brotli  # type: ignore[import-untyped]
            except ImportError:
                self.decompress = None
                self.note = "cannot decode br (the brotli package is missing): timed the raw bytes only"
            else:
                self.decompress = brotli.Decompressor().process
        else:
            self.decompress = None
            self.note = f"cannot decode {enc!r}: timed the raw bytes only"

    def _inflate(self, data: bytes) -> bytes:
        # "deflate" is zlib-wrapped by the standard (RFC 9110), raw by some servers: the
        # first two bytes tell which (RFC 1950's header check), so wait for them.
        if self._deflate is None:
            self._head += data
            if len(self._head) < 2:
                return b""
            data, self._head = self._head, b""
            wrapped = data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
            self._deflate = zlib.decompressobj() if wrapped else zlib.decompressobj(-zlib.MAX_WBITS)
        return bytes(self._deflate.decompress(data))


_TEXT_TICK = re.compile(rb"^tick seq=(\d+) of=(\d+) t=([0-9.]+) sent=([0-9.]+)$")


class _TickReader:
    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self.sse = SSEDecoder()
        self.pending = b""

    def feed(self, data: bytes) -> list[tuple[int, float]]:
        """(seq, server t) of every tick completed by ``data``."""
        found: list[tuple[int, float]] = []
        if self.mode == "sse":
            for event in self.sse.feed(data):
                if event.event == "tick":
                    tick = orjson.loads(event.data)
                    found.append((int(tick["seq"]), float(tick["t"])))
            return found
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            match = _TEXT_TICK.match(line)
            if match:
                found.append((int(match[1]), float(match[3])))
        return found


def _client(timeout: float, key: str | None = None) -> httpx.Client:
    try:
        import h2  # noqa: F401  (HTTP/2 when the server offers it, as browsers do)
        http2 = True
    except ImportError:
        http2 = False
    return httpx.Client(
        headers={**BROWSER_HEADERS, **({"authorization": f"Bearer {key}"} if key else {})},
        http2=http2, follow_redirects=True,
        timeout=httpx.Timeout(connect=10.0, read=timeout, write=10.0, pool=10.0),
    )


def run_probe(base: str, mode: Mode, *, ticks: int = TICKS, interval: float = INTERVAL,
              key: str | None = None) -> Probe:
    url = probe_url(base, ticks=ticks, interval=interval)
    probe = Probe(mode=mode, url=url, expected_ticks=ticks, intended_spread=(ticks - 1) * interval)
    headers = {"accept": "text/event-stream"} if mode == "sse" else {}
    with _client(timeout=ticks * interval + 30, key=key) as client:
        began = time.perf_counter()
        try:
            with client.stream("GET", url, headers=headers) as response:
                _read(probe, response, began)
        except httpx.TransportError as exc:
            if probe.status is None:
                raise Unreachable(_describe(exc)) from None
            probe.error = _describe(exc)
        except httpx.InvalidURL as exc:
            raise Unreachable(str(exc)) from None
    return probe


def _read(probe: Probe, response: httpx.Response, began: float) -> None:
    probe.headers_at = time.perf_counter() - began
    probe.status = response.status_code
    probe.http_version = response.http_version
    probe.url = str(response.url)
    probe.headers = {k.lower(): v for k, v in response.headers.items()}
    probe.content_encoding = response.headers.get("content-encoding")
    if response.status_code != 200:
        probe.body_excerpt = response.read()[:300].decode("utf-8", "replace").strip()
        return
    decoder = _Decoder(probe.content_encoding)
    probe.decode_note = decoder.note
    reader = _TickReader(probe.mode)
    for raw in response.iter_raw():
        now = time.perf_counter() - began
        if probe.first_byte_at is None:
            probe.first_byte_at = now
        probe.raw_times.append(now)
        probe.raw_bytes += len(raw)
        if decoder.decompress is None:
            continue
        for seq, sent_t in reader.feed(decoder.decompress(raw)):
            probe.ticks.append(Tick(seq=seq, sent_t=sent_t, arrived=now))
    probe.ended_at = time.perf_counter() - began
    probe.complete = len(probe.ticks) == probe.expected_ticks or decoder.decompress is None


def run_idle_probe(base: str, seconds: float, *, key: str | None = None) -> IdleProbe:
    """One tick at once, then ``seconds`` of silence, then the last tick.

    The silence is timed from the request: the probe sends its first tick at once, and a
    proxy that buffers would hide from doctor when that was."""
    url = probe_url(base, ticks=2, interval=0, idle=seconds)
    idle = IdleProbe(url=url, seconds=seconds)
    with _client(timeout=seconds + 30, key=key) as client:
        began = time.perf_counter()
        try:
            with client.stream("GET", url, headers={"accept": "text/plain"}) as response:
                idle.status = response.status_code
                if response.status_code != 200:
                    # A proxy that held even the headers back answers its own error.
                    response.read()
                else:
                    decoder = _Decoder(response.headers.get("content-encoding"))
                    reader = _TickReader("text")
                    for raw in response.iter_raw():
                        if decoder.decompress is not None:
                            idle.ticks += len(reader.feed(decoder.decompress(raw)))
        except httpx.TransportError as exc:
            if idle.status is None and isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
                raise Unreachable(_describe(exc)) from None
            idle.error = _describe(exc)
        ended = time.perf_counter()
    if idle.ticks < 2:
        idle.cut = True
        idle.cut_after = ended - began
    return idle


def probe_url(base: str, **params: float) -> str:
    """``base`` may be the site (``https://host/``), a prefix (``https://host/chat/``) or the
    probe route itself."""
    parts = urlsplit(base if "://" in base else "http://" + base)
    path = parts.path
    if not path.rstrip("/").endswith("/api/probe"):
        path = path.rstrip("/") + "/api/probe"
    query = "&".join(f"{k}={v:g}" for k, v in params.items())
    return urlunsplit((parts.scheme, parts.netloc, path, query, ""))


def _describe(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --------------------------------------------------------------------------- the proxy

@dataclass
class ProxyGuess:
    name: str
    """One of ``PROXIES``; ``generic`` when nothing names it."""
    evidence: str


def detect_proxy(headers: dict[str, str]) -> ProxyGuess:
    """The outermost hop that the response headers name (the one nearest the client)."""
    server = headers.get("server", "").lower()
    via = headers.get("via", "").lower()
    if "cf-ray" in headers or server == "cloudflare":
        return ProxyGuess("cloudflare", _evidence(headers, "cf-ray", "server"))
    if "x-amz-cf-id" in headers or "cloudfront" in via:
        return ProxyGuess("aws", _evidence(headers, "x-amz-cf-id", "via") + " (CloudFront)")
    if server.startswith("awselb") or "awsalb" in headers.get("set-cookie", "").lower():
        return ProxyGuess("aws", _evidence(headers, "server", "set-cookie") + " (ALB)")
    if "caddy" in server or "caddy" in via:
        return ProxyGuess("caddy", _evidence(headers, "server", "via"))
    if "haproxy" in server or "haproxy" in via:
        return ProxyGuess("haproxy", _evidence(headers, "server", "via"))
    if server.startswith("nginx") or "nginx" in via:
        # ingress-nginx says only "nginx"; its advice is given alongside nginx's.
        return ProxyGuess("nginx", _evidence(headers, "server", "via"))
    if server.startswith("uvicorn") and not via:
        return ProxyGuess("generic", "Server: uvicorn: tokenrelay itself, or a proxy that passes its headers on")
    return ProxyGuess("generic", "no header names a known proxy")


def _evidence(headers: dict[str, str], *names: str) -> str:
    found = [f"{name}: {headers[name]}" for name in names if name in headers]
    return ", ".join(found[:1]) if found else "response headers"


FIXES: dict[str, dict[str, list[str]]] = {
    "nginx": {
        "buffered": [
            (
                "In the location that proxies tokenrelay: `proxy_buffering off;` and `proxy_cache off;` "
                f"(deploy/nginx/tokenrelay.conf does this in `location ~ {NGINX_STREAM_LOCATION}`, "
                "every streaming route)."
            ),
            (
                "Do not list X-Accel-Buffering in `proxy_ignore_headers`: tokenrelay sends "
                "`X-Accel-Buffering: no` so that nginx streams these routes even where it buffers the rest."
            ),
            (
                "Two nginx in a row: nginx consumes X-Accel-Buffering, so the outer one never sees it; "
                "add `proxy_buffering off;` in the outer one or `proxy_pass_header X-Accel-Buffering;` in the inner."
            ),
        ],
        "compressed": [
            (
                "nginx compresses this stream: `gzip off;` in that location (or leave text/plain and "
                "text/event-stream out of `gzip_types`); compression with buffering on holds pieces back."
            ),
        ],
        "idle": [
            (
                "Raise `proxy_read_timeout` (default 60s) in that location above the model's slowest time "
                f"to first token and tokenrelay's TOKENRELAY_READ_TIMEOUT (120 s): `proxy_read_timeout "
                f"{READ_TIMEOUT_ADVICE};`, as deploy/nginx/tokenrelay.conf ships. `proxy_send_timeout` and "
                "`send_timeout` are about a slow reader, not a slow model: leave them. SSE's `: ping` "
                "resets the read timeout."
            ),
        ],
        "ingress-nginx": [
            (
                "On Kubernetes ingress-nginx the same settings are annotations: "
                "`nginx.ingress.kubernetes.io/proxy-buffering: \"off\"`, "
                f"`nginx.ingress.kubernetes.io/proxy-read-timeout: \"{READ_TIMEOUT_ADVICE[:-1]}\"`, and "
                "`use-gzip: \"false\"` in the controller's ConfigMap."
            ),
        ],
    },
    "ingress-nginx": {
        "buffered": [
            (
                "Annotate the Ingress: `nginx.ingress.kubernetes.io/proxy-buffering: \"off\"` "
                "(and `nginx.ingress.kubernetes.io/proxy-request-buffering: \"off\"`)."
            ),
        ],
        "compressed": [
            (
                "The controller compresses: set `use-gzip: \"false\"` (or drop text/plain and "
                "text/event-stream from `gzip-types`) in its ConfigMap."
            ),
        ],
        "idle": [
            (
                f"Annotate the Ingress: `nginx.ingress.kubernetes.io/proxy-read-timeout: \"{READ_TIMEOUT_ADVICE[:-1]}\"` "
                "(default 60 s; above the model's slowest time to first token and TOKENRELAY_READ_TIMEOUT, "
                "120 s). The send timeout is about a slow reader, not a slow model: leave it."
            ),
        ],
    },
    "caddy": {
        "buffered": [
            "In the `reverse_proxy` block: `flush_interval -1` (flush every write to the client).",
        ],
        "compressed": [
            (
                "Caddy's `encode` compresses this stream: keep it off the stream routes, e.g. "
                f"`@compressible not path {CADDY_STREAM_PATHS}` and `encode @compressible gzip` "
                "(as deploy/caddy/Caddyfile does), or use `flush_interval -1` so each piece is flushed."
            ),
        ],
        "idle": [
            (
                "Caddy has no read timeout unless one is set: look for `read_timeout`/`response_header_timeout` "
                f"in `transport http` (deploy/caddy/Caddyfile sets both to {READ_TIMEOUT_ADVICE}), or for a hop "
                "in front of Caddy that cuts idle connections."
            ),
        ],
    },
    "haproxy": {
        "buffered": [
            (
                "HAProxy forwards each piece as it comes unless something holds it: remove `compression` "
                "from the frontend/backend for tokenrelay (or drop text/plain and text/event-stream from "
                "`compression type`)."
            ),
        ],
        "compressed": [
            "HAProxy compresses this stream: remove `compression algo`/`compression type` for tokenrelay's backend.",
        ],
        "idle": [
            (
                "Raise `timeout server` (the longest silence from the app) and `timeout client` "
                f"in the backend/defaults above the model's slowest time to first token and "
                f"TOKENRELAY_READ_TIMEOUT (120 s): `timeout server {READ_TIMEOUT_ADVICE}`, as "
                "deploy/haproxy/haproxy.cfg ships."
            ),
        ],
    },
    "cloudflare": {
        "buffered": [
            (
                "Cloudflare streams by default; it buffers when Response Buffering is on (Enterprise) or a "
                "Configuration Rule sets response body buffering: set it to `none` for /api/*."
            ),
            "Bypass the cache for /api/* with a Cache Rule.",
        ],
        "compressed": [
            (
                "Cloudflare recompresses responses; tokenrelay's `Cache-Control: no-transform` asks it not to. "
                "If it still compresses, a Compression Rule can disable it for /api/*."
            ),
        ],
        "idle": [
            (
                "Cloudflare ends a response that is silent for 100 s (error 524); only Enterprise plans can "
                "raise it. Use SSE: tokenrelay's `: ping` every TOKENRELAY_HEARTBEAT_INTERVAL seconds "
                "(15 by default) keeps the stream alive."
            ),
        ],
    },
    "aws": {
        "buffered": [
            (
                "An Application Load Balancer streams responses as they come; CloudFront streams chunked "
                "responses too, unless a cache behaviour caches /api/*: use the CachingDisabled policy for it."
            ),
        ],
        "compressed": [
            (
                "CloudFront compresses when the behaviour's 'Compress objects automatically' is on: turn it "
                "off for /api/*."
            ),
        ],
        "idle": [
            (
                "ALB: raise the load balancer's `idle_timeout.timeout_seconds` (60 s by default, up to 4000). "
                "CloudFront: raise the origin's response timeout (30 s by default) and keep-alive timeout."
            ),
        ],
    },
    "generic": {
        "buffered": [
            (
                "Something between doctor and tokenrelay holds the response back until it is complete: turn "
                f"response buffering off for the streaming routes ({_ROUTES}), or make that proxy honour "
                "`X-Accel-Buffering: no`, which tokenrelay sends."
            ),
            (
                "nginx: `proxy_buffering off;` · Caddy: `flush_interval -1` · HAProxy: no `compression` · "
                "Apache: `flushpackets=on` on the ProxyPass · Traefik: streams by default (check its middlewares)."
            ),
        ],
        "compressed": [
            (
                "A hop compresses this stream; compression is the commonest cause of buffering. Leave "
                f"text/plain and text/event-stream uncompressed on the stream routes ({_ROUTES})."
            ),
        ],
        "idle": [
            (
                "Raise the idle/read timeout of the proxy or load balancer in front of tokenrelay "
                "(nginx `proxy_read_timeout`, HAProxy `timeout server`, ALB `idle_timeout.timeout_seconds`)."
            ),
        ],
    },
}


def fixes_for(proxy: str, problem: str) -> list[str]:
    fixes = list(FIXES.get(proxy, FIXES["generic"]).get(problem, []))
    if proxy == "nginx" and problem in ("buffered", "idle"):
        fixes += FIXES["nginx"]["ingress-nginx"]
    return fixes


# --------------------------------------------------------------------------- the report

@dataclass
class Finding:
    severity: Literal["problem", "note"]
    code: str
    message: str
    fixes: list[str] = field(default_factory=list)


@dataclass
class Report:
    url: str
    reachable: bool = True
    unreachable_reason: str | None = None
    proxy: ProxyGuess | None = None
    hops: dict[str, str] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)
    idle: IdleProbe | None = None
    direct_url: str | None = None
    direct: list[Probe] = field(default_factory=list)
    direct_unreachable: str | None = None
    resume: ResumeCheck | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if not self.reachable or self.direct_unreachable:
            return 2
        return 1 if any(f.severity == "problem" for f in self.findings) else 0

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "reachable": self.reachable,
            "unreachable_reason": self.unreachable_reason,
            "proxy": asdict(self.proxy) if self.proxy else None,
            "hops": self.hops,
            "probes": [p.to_dict() for p in self.probes],
            "idle": self.idle.to_dict() if self.idle else None,
            "direct": {
                "url": self.direct_url,
                "unreachable_reason": self.direct_unreachable,
                "probes": [p.to_dict() for p in self.direct],
            } if self.direct_url else None,
            "resume": self.resume.to_dict() if self.resume else None,
            "findings": [asdict(f) for f in self.findings],
        }


def diagnose(url: str, *, direct: str | None = None, idle: float | None = None, proxy: str | None = None,
             ticks: int = TICKS, interval: float = INTERVAL, key: str | None = None, resume: bool = False,
             model: str | None = None) -> Report:
    report = Report(url=url)
    try:
        report.probes = [run_probe(url, mode, ticks=ticks, interval=interval, key=key) for mode in ("text", "sse")]
    except Unreachable as exc:
        report.reachable = False
        report.unreachable_reason = str(exc)
        report.findings.append(Finding("problem", "unreachable", f"No answer from {url}: {exc}."))
        return report
    first = report.probes[0]
    report.hops = {k: v for k, v in first.headers.items() if k in HOP_HEADERS}
    report.proxy = ProxyGuess(proxy, "given with --proxy") if proxy else detect_proxy(first.headers)
    name = report.proxy.name
    if first.verdict == "no_probe":
        report.findings.append(_no_probe(first, name))
        return report
    report.findings.extend(_judge(report.probes, name))
    if idle:
        try:
            report.idle = run_idle_probe(url, idle, key=key)
        except Unreachable as exc:
            report.findings.append(Finding("problem", "unreachable", f"The idle probe got no answer: {exc}."))
        else:
            report.findings.extend(_judge_idle(report.idle, name))
    if direct:
        report.direct_url = direct
        try:
            report.direct = [run_probe(direct, mode, ticks=ticks, interval=interval, key=key)
                             for mode in ("text", "sse")]
        except Unreachable as exc:
            report.direct_unreachable = str(exc)
            report.findings.append(Finding("problem", "direct_unreachable", f"No answer from {direct}: {exc}."))
        else:
            report.findings.extend(_compare(report.probes, report.direct, direct))
    if resume:
        report.resume = check_resume(url, key=key, model=model)
        message, fixes = describe_resume(report.resume)
        severity: Literal["problem", "note"] = "note" if report.resume.ok else "problem"
        report.findings.append(Finding(severity, f"resume_{report.resume.outcome}", message, fixes))
    return report


_LABEL = {"text": "plain-text", "sse": "SSE"}
_COLUMN = {"text": "plain text", "sse": "SSE"}


def _judge(probes: list[Probe], proxy: str) -> list[Finding]:
    findings = []
    buffered = [p for p in probes if p.verdict == "buffered"]
    if buffered:
        which = " and ".join(_LABEL[p.mode] for p in buffered)
        plural = "streams are" if len(buffered) > 1 else "stream is"
        together = [p for p in buffered if p.ticks and p.arrival_spread < 0.1 * p.sent_spread]
        if len(buffered) > 1 and len(together) == len(buffered):
            first = buffered[0]
            hows = [(f"in each, all {len(first.ticks)} ticks arrived together at the end, about "
                    f"{first.ticks[-1].arrived:.2f} s after the request, though they were sent over "
                    f"{first.sent_spread:.2f} s")]
        elif len(buffered) > 1:
            hows = [f"{_LABEL[p.mode]}: {_how_buffered(p)}" for p in buffered]
        else:
            hows = [_how_buffered(buffered[0])]
        encodings = sorted({p.content_encoding for p in buffered if p.content_encoding})
        fixes = fixes_for(proxy, "buffered")
        message = f"The {which} {plural} BUFFERED ({'; '.join(hows)})"
        if encodings:
            fixes = fixes_for(proxy, "compressed") + fixes
            message += f"; the response was compressed ({', '.join(encodings)}), the likely cause"
        findings.append(Finding("problem", "buffered", message + ".", fixes))
    for probe in probes:
        label = _LABEL[probe.mode]
        if probe.verdict == "incomplete":
            why = f" ({probe.error})" if probe.error else ""
            findings.append(Finding(
                "problem", f"incomplete_{probe.mode}",
                f"The {label} stream ended early: {len(probe.ticks)} of {probe.expected_ticks} ticks{why}.",
                fixes_for(proxy, "idle")))
        elif probe.verdict == "ok" and probe.content_encoding:
            findings.append(Finding(
                "note", f"compressed_{probe.mode}",
                f"The {label} stream is compressed ({probe.content_encoding}) but still arrives piece by piece."))
        if probe.decode_note:
            findings.append(Finding("note", f"undecoded_{probe.mode}", probe.decode_note))
    return findings


def _how_buffered(probe: Probe) -> str:
    if not probe.ticks:
        return (f"the raw bytes arrived within {probe.raw_spread:.2f} s, though the ticks were sent over "
                f"{probe.intended_spread:.2f} s")
    if probe.arrival_spread < 0.1 * probe.sent_spread:
        return (f"all {len(probe.ticks)} ticks arrived together {probe.ticks[-1].arrived:.2f} s after the "
                f"request, though they were sent over {probe.sent_spread:.2f} s")
    return f"a tick was held back {probe.holdback:.2f} s while the ticks were sent over {probe.sent_spread:.2f} s"


def _no_probe(probe: Probe, proxy: str) -> Finding:
    if probe.status == 404 or (probe.status == 200 and not probe.is_tokenrelay):
        message = (f"{probe.url} answered {probe.status} without tokenrelay's probe: the URL does not reach "
                   "tokenrelay (or one older than the probe route). Point doctor at the address that serves "
                   "tokenrelay's page.")
        return Finding("problem", "no_probe", message)
    excerpt = f" ({probe.body_excerpt[:120]})" if probe.body_excerpt else ""
    fixes = []
    if probe.status == 401:
        fixes.append("This tokenrelay requires a client key: pass one with --key (or TOKENRELAY_API_KEY).")
    if probe.status in (502, 503, 504):
        fixes.append("Check that tokenrelay runs and that the proxy's upstream address points at it "
                     "(`tokenrelay serve --host`/`--port`).")
    return Finding("problem", "http_error", f"{probe.url} answered {probe.status}{excerpt}.", fixes)


def _judge_idle(idle: IdleProbe, proxy: str) -> list[Finding]:
    if not idle.cut:
        return [Finding("note", "idle_ok", f"A stream silent for {idle.seconds:g} s was not cut.")]
    after = idle.cut_after or 0.0
    how = f"the proxy answered {idle.status}" if idle.status not in (None, 200) else "the connection was cut"
    message = f"A silent stream is CUT: after {after:.1f} s of silence {how} (asked for {idle.seconds:g} s)."
    heartbeat = 15.0
    if after > heartbeat:
        message += (f" SSE streams survive it (tokenrelay's heartbeat every {heartbeat:g} s is shorter); plain-text "
                    f"streams are cut whenever the model is silent for {after:.0f} s, e.g. thinking before the first "
                    "token.")
    else:
        message += (f" Even SSE heartbeats at the default {heartbeat:g} s are too rare: set "
                    f"TOKENRELAY_HEARTBEAT_INTERVAL below {after:.0f} s, or raise the timeout.")
    return [Finding("problem", "idle_cut", message, fixes_for(proxy, "idle"))]


def _compare(proxied: list[Probe], direct: list[Probe], direct_url: str) -> list[Finding]:
    findings = []
    direct_buffered = [p for p in direct if p.verdict == "buffered"]
    proxied_buffered = [p for p in proxied if p.verdict == "buffered"]
    if any(p.verdict == "no_probe" for p in direct):
        findings.append(Finding("problem", "direct_no_probe",
                                f"{direct_url} did not answer with tokenrelay's probe ({direct[0].status})."))
    elif direct_buffered:
        findings.append(Finding(
            "problem", "direct_buffered",
            f"The app's own address ({direct_url}) buffers too: the cause is not (only) the proxy, "
            "but something at the app's side — another proxy or middleware in front of the process.",
            FIXES["generic"]["buffered"]))
    elif proxied_buffered:
        findings.append(Finding("note", "buffering_in_proxy",
                                f"Direct ({direct_url}) streams: the buffering is in the proxy between."))
    else:
        findings.append(Finding("note", "direct_ok", f"Direct ({direct_url}) streams as well."))
    return findings


# --------------------------------------------------------------------------- plain words

def render(report: Report) -> str:
    lines = [f"tokenrelay doctor {report.url}", ""]
    if not report.reachable:
        lines += [f"  UNREACHABLE  {report.unreachable_reason}", "",
                  "Result: unreachable (exit 2). Check the URL, DNS, and that the server is up."]
        return "\n".join(lines) + "\n"
    first = report.probes[0]
    lines.append(f"  probe        GET {first.url} → {first.status} {first.http_version or ''}".rstrip())
    if report.proxy:
        lines.append(f"  proxy        {report.proxy.name} ({report.proxy.evidence})")
    hops = "; ".join(f"{k}: {v}" for k, v in report.hops.items()) or "none named"
    lines.append(f"  hops         {hops}")
    for probe in report.probes:
        if probe.verdict != "no_probe":
            lines.append(f"  {_COLUMN[probe.mode]:<13}{_summary(probe)}")
    if report.idle:
        idle = report.idle
        state = (f"CUT after {idle.cut_after:.1f} s" if idle.cut and idle.cut_after is not None
                 else "not cut")
        lines.append(f"  idle         a {idle.seconds:g} s silence: {state}")
    for probe in report.direct:
        lines.append(f"  {'direct ' + _COLUMN[probe.mode].split()[-1]:<13}{_summary(probe)}")
    if report.direct_unreachable:
        lines.append(f"  direct       UNREACHABLE  {report.direct_unreachable}")
    if report.resume:
        lines.append(f"  resume       {_resume_summary(report.resume)}")
    problems = [f for f in report.findings if f.severity == "problem"]
    notes = [f for f in report.findings if f.severity == "note"]
    if notes:
        lines.append("")
        lines += [f"  note: {f.message}" for f in notes]
    for finding in problems:
        lines += ["", f"PROBLEM: {finding.message}"]
        proxy = report.proxy.name if report.proxy else "generic"
        lines += [f"  fix ({proxy}): {fix}" for fix in finding.fixes]
    lines.append("")
    if report.exit_code == 0:
        resumes = ", and a dropped stream resumes" if report.resume else ""
        lines.append(f"Result: OK — {report.url} streams{resumes}.")
    elif report.exit_code == 2:
        lines.append("Result: unreachable (exit 2).")
    else:
        lines.append(f"Result: {len(problems)} problem{'s' if len(problems) != 1 else ''} found (exit 1).")
    return "\n".join(lines) + "\n"


def _summary(probe: Probe) -> str:
    if probe.verdict == "no_probe":
        return f"HTTP {probe.status}: no probe"
    verdict = {"ok": "OK", "buffered": "BUFFERED", "incomplete": "INCOMPLETE"}[probe.verdict]
    first = f"{probe.first_byte_at * 1000:.0f} ms" if probe.first_byte_at is not None else "-"
    enc = probe.content_encoding or "none"
    return (f"{verdict:<10} {len(probe.ticks)}/{probe.expected_ticks} ticks arrived over "
            f"{probe.arrival_spread:.2f} s (sent over {probe.sent_spread:.2f} s); longest hold-back "
            f"{probe.holdback:.2f} s; first byte {first}; compression {enc}")


def _resume_summary(check: ResumeCheck) -> str:
    read = f"{len(check.first_ids)} events read, connection dropped"
    if check.ok:
        resumed = (f"events {check.resumed_ids[0]}–{check.resumed_ids[-1]}" if check.resumed_ids
                   else "no further events")
        return f"{'OK':<10} {read}, resumed with Last-Event-ID: {resumed}, then {check.ending}"
    return f"{'FAILED':<10} {read}: {check.outcome.replace('_', ' ')}"
