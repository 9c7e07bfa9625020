"""Run a real nginx, Caddy or HAProxy in front of a URL, on a free loopback port.

Each proxy runs the config shipped in ``deploy/``, generated into a temp dir with only the
upstream address and the listen port changed (and, when asked, the read timeout), so the
tests prove the file a user copies::

    with start_nginx(relay.url) as proxy:
        read_stream(proxy.url, chat())

``variant`` derives the badly-behaved setups the tests compare against from the same shipped
file (``NGINX_VARIANTS``, ``HAPROXY_VARIANTS``). ``read_timeout`` shortens the proxy's wait
for the app (nginx ``proxy_read_timeout``; Caddy ``response_header_timeout`` and
``read_timeout``; HAProxy ``timeout server``). ``extra`` adds directives to the nginx
``server`` block, or a line to HAProxy's ``defaults`` section.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from urllib.parse import urlsplit

from servers import free_port, stop_process, wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX_CONF = DEPLOY / "nginx" / "tokenrelay.conf"
NGINX_MULTI_CONF = DEPLOY / "nginx" / "tokenrelay-multi.conf"
CADDYFILE = DEPLOY / "caddy" / "Caddyfile"
HAPROXY_CFG = DEPLOY / "haproxy" / "haproxy.cfg"

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class Proxy:
    """A proxy process in the background; ``url`` is its loopback address."""

    def __init__(self, kind: str, args: list[str], *, port: int, workdir: Path, config_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.workdir = workdir
        self.config_path = config_path
        self.output_path = workdir / "output.log"
        self._output = open(self.output_path, "wb")
        self.proc = subprocess.Popen(args, cwd=workdir, env={**os.environ, **(env or {})},
                                     stdout=self._output, stderr=subprocess.STDOUT)
        try:
            wait_until(self._listening, timeout=15)
        except AssertionError:
            self.stop(keep_files=True)
            raise AssertionError(f"{kind} did not start:\n{self.log()}") from None

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log()}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def config(self) -> str:
        return self.config_path.read_text()

    def log(self) -> str:
        """Everything the proxy wrote: its output and, for nginx, its error log."""
        parts = []
        for path in (self.output_path, self.workdir / "logs" / "error.log"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self, *, keep_files: bool = False) -> None:
        stop_process(self.proc)
        self._output.close()
        if not keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or not parts.port:
        raise ValueError(f"expected http://host:port, got {url!r}")
    return f"{parts.hostname}:{parts.port}"


def _replace(text: str, pattern: str, replacement: str, *, what: str) -> str:
    """``re.sub`` that insists on a match, so a change to a shipped file breaks loudly."""
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count == 0:
        raise AssertionError(f"shipped config no longer has {what} ({pattern!r})")
    return new


# --- nginx ---------------------------------------------------------------------------------

def _gzip_buffering(conf: str) -> str:
    """A common setup: compression on for text, buffering left at nginx's default (on)."""
    conf = _replace(conf, r"^(\s*)proxy_buffering off;", r"\1# proxy_buffering: default (on)",
                    what="proxy_buffering off")
    conf = _replace(conf, r"^(\s*)gzip off;",
                    r"\1gzip on;\n\1gzip_types text/plain text/event-stream application/json;",
                    what="gzip off")
    return conf


def _control(conf: str) -> str:
    """``gzip`` plus nginx told to disregard the app's ``X-Accel-Buffering: no``."""
    conf = _gzip_buffering(conf)
    return _replace(conf, r"^(\s*)proxy_pass_header X-Accel-Buffering;",
                    r"\1proxy_ignore_headers X-Accel-Buffering;", what="proxy_pass_header X-Accel-Buffering")


def _buffering(conf: str) -> str:
    """nginx's default buffering, no compression, and the app's header disregarded."""
    conf = _replace(conf, r"^(\s*)proxy_buffering off;", r"\1# proxy_buffering: default (on)",
                    what="proxy_buffering off")
    return _replace(conf, r"^(\s*)proxy_pass_header X-Accel-Buffering;",
                    r"\1proxy_ignore_headers X-Accel-Buffering;", what="proxy_pass_header X-Accel-Buffering")


def _no_reemit(conf: str) -> str:
    """The shipped config without passing ``X-Accel-Buffering`` on to a proxy in front."""
    return _replace(conf, r"^(\s*)proxy_pass_header X-Accel-Buffering;", r"\1# (X-Accel-Buffering not passed on)",
                    what="proxy_pass_header X-Accel-Buffering")


STREAM_MARK = "X-Test-Stream-Location"


def _marked(conf: str) -> str:
    """The shipped config, with a header marking each response that went through the stream
    routes' ``location``: which paths it covers, as nginx itself matches them."""
    return _replace(conf, r"^(\s*)proxy_pass_header X-Accel-Buffering;",
                    rf"\g<0>\n\1add_header {STREAM_MARK} yes always;", what="proxy_pass_header X-Accel-Buffering")


NGINX_VARIANTS: dict[str, Callable[[str], str]] = {
    "shipped": lambda conf: conf,
    # shipped, with the stream location's responses marked (STREAM_MARK)
    "marked": _marked,
    # gzip on for text/plain and text/event-stream, buffering on: streams only because
    # nginx obeys the app's X-Accel-Buffering: no.
    "gzip": _gzip_buffering,
    # the same, ignoring X-Accel-Buffering: the answer comes in one piece at the end.
    "control": _control,
    # buffering on, no compression, X-Accel-Buffering ignored: buffering alone.
    "buffering": _buffering,
    # shipped, but the X-Accel-Buffering header stops here (as nginx does by default).
    "no-reemit": _no_reemit,
}


def nginx_site(upstream_url: str, *, port: int, variant: str = "shipped", read_timeout: float | None = None,
               extra: str = "") -> str:
    """The shipped site file, pointed at ``upstream_url`` and listening on ``port``."""
    conf = NGINX_VARIANTS[variant](NGINX_CONF.read_text())
    conf = _replace(conf, r"^(\s*)server 127\.0\.0\.1:8000;", rf"\g<1>server {_host_port(upstream_url)};",
                    what="the upstream address")
    conf = _replace(conf, r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{port};", what="listen 80")
    if read_timeout is not None:
        conf = _replace(conf, r"^(\s*)proxy_read_timeout \S+;", rf"\g<1>proxy_read_timeout {read_timeout:g}s;",
                        what="proxy_read_timeout")
    if extra:
        conf = _replace(conf, r"^(\s*)server_name _;", rf"\g<0>\n\1{extra}", what="server_name _")
    return conf


def nginx_multi_site(upstream_urls: list[str], *, port: int, balance: str | None = None) -> str:
    """The shipped several-instances site file, pointed at ``upstream_urls`` (as many as the
    file has ``CHANGE`` server lines; more are added alike) and listening on ``port``.
    ``balance``: another balancing directive than the shipped ``least_conn`` ("" for round
    robin), for tests that need to know which instance a request reaches."""
    conf = NGINX_MULTI_CONF.read_text()
    servers = re.findall(r"^\s*server 127\.0\.0\.1:800\d (.*);\s*# CHANGE.*$", conf, flags=re.MULTILINE)
    if len(servers) < 2:
        raise AssertionError("shipped multi-instance config no longer has its CHANGE server lines")
    lines = "".join(f"    server {_host_port(url)} {servers[0]};\n" for url in upstream_urls)
    conf = _replace(conf, r"^\s*server 127\.0\.0\.1:8001 .*\n(\s*server 127\.0\.0\.1:8002 .*\n)", lines,
                    what="the instances' addresses")
    if balance is not None:
        conf = _replace(conf, r"^(\s*)least_conn;", rf"\g<1>{balance}", what="least_conn")
    return _replace(conf, r"^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{port};", what="listen 80")


def start_nginx_multi(upstream_urls: list[str], *, balance: str | None = None) -> Proxy:
    """nginx running the shipped several-instances site file in front of ``upstream_urls``."""
    port = free_port()
    return _run_nginx(nginx_multi_site(upstream_urls, port=port, balance=balance), port=port)


def start_nginx(upstream_url: str, *, variant: str = "shipped", read_timeout: float | None = None,
                extra: str = "") -> Proxy:
    """nginx running the shipped site file (or a ``variant`` of it) in front of ``upstream_url``."""
    port = free_port()
    return _run_nginx(nginx_site(upstream_url, port=port, variant=variant, read_timeout=read_timeout, extra=extra),
                      port=port)


def _run_nginx(site: str, *, port: int) -> Proxy:
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-nginx-"))
    (workdir / "logs").mkdir()
    (workdir / "tokenrelay.conf").write_text(site)
    # The frame a distribution's nginx.conf gives a site file, with every path in workdir.
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the 0700 workdir
    main = f"""{user}worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/logs/access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    include {workdir}/tokenrelay.conf;
}}
"""
    config_path = workdir / "nginx.conf"
    config_path.write_text(main)
    args = [NGINX, "-p", str(workdir), "-e", str(workdir / "logs" / "error.log"), "-c", str(config_path),
            "-g", "daemon off;"]
    proxy = Proxy("nginx", args, port=port, workdir=workdir, config_path=config_path)
    proxy.config_path = workdir / "tokenrelay.conf"
    return proxy


# --- Caddy ---------------------------------------------------------------------------------

COMPRESSIBLE_MARK = "X-Test-Compressible"


def caddyfile(upstream_url: str, *, port: int, read_timeout: float | None = None, marked: bool = False) -> str:
    """The shipped Caddyfile, pointed at ``upstream_url`` and serving plain HTTP on ``port``;
    ``marked``: responses that ``@compressible`` matches carry ``COMPRESSIBLE_MARK``."""
    conf = CADDYFILE.read_text()
    if marked:
        conf = _replace(conf, r"^(\s*)encode @compressible gzip", rf"\g<0>\n\1header @compressible {COMPRESSIBLE_MARK} yes",
                        what="encode @compressible gzip")
    conf = _replace(conf, r"^tokenrelay\.example\.com \{", f"http://127.0.0.1:{port} {{", what="the site address")
    conf = _replace(conf, r"^(\s*)reverse_proxy 127\.0\.0\.1:8000 \{",
                    rf"\g<1>reverse_proxy {_host_port(upstream_url)} {{", what="the upstream address")
    if read_timeout is not None:
        for name in ("response_header_timeout", "read_timeout"):
            conf = _replace(conf, rf"^(\s*){name} \S+", rf"\g<1>{name} {read_timeout:g}s", what=name)
    # No admin endpoint: many instances run side by side in tests.
    return "{\n\tadmin off\n}\n\n" + conf


def start_caddy(upstream_url: str, *, read_timeout: float | None = None, marked: bool = False) -> Proxy:
    """Caddy running the shipped Caddyfile in front of ``upstream_url``."""
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-caddy-"))
    port = free_port()
    config_path = workdir / "Caddyfile"
    config_path.write_text(caddyfile(upstream_url, port=port, read_timeout=read_timeout, marked=marked))
    env = {"HOME": str(workdir), "XDG_DATA_HOME": str(workdir / "data"), "XDG_CONFIG_HOME": str(workdir / "config")}
    args = [CADDY, "run", "--config", str(config_path), "--adapter", "caddyfile"]
    return Proxy("caddy", args, port=port, workdir=workdir, config_path=config_path, env=env)


# --- HAProxy -------------------------------------------------------------------------------

def _haproxy_delay(conf: str) -> str:
    """HAProxy's default: small writes may wait for more data (no ``http-no-delay``)."""
    return _replace(conf, r"^(\s*)option http-no-delay", r"\1# option http-no-delay", what="option http-no-delay")


HAPROXY_VARIANTS: dict[str, Callable[[str], str]] = {
    "shipped": lambda conf: conf,
    # tokens arrive in bursts about 200 ms apart
    "delay": _haproxy_delay,
}


def haproxy_cfg(upstream_url: str, *, port: int, variant: str = "shipped", read_timeout: float | None = None,
                client_timeout: float | None = None, extra: str = "") -> str:
    """The shipped haproxy.cfg, pointed at ``upstream_url`` and listening on ``port``."""
    conf = HAPROXY_VARIANTS[variant](HAPROXY_CFG.read_text())
    conf = _replace(conf, r"^(\s*)bind :80\b", rf"\g<1>bind 127.0.0.1:{port}", what="bind :80")
    conf = _replace(conf, r"^(\s*)server app 127\.0\.0\.1:8000\b", rf"\g<1>server app {_host_port(upstream_url)}",
                    what="the upstream address")
    if read_timeout is not None:
        conf = _replace(conf, r"^(\s*)timeout server \S+", rf"\g<1>timeout server {read_timeout:g}s",
                        what="timeout server")
    if client_timeout is not None:
        conf = _replace(conf, r"^(\s*)timeout client \S+", rf"\g<1>timeout client {client_timeout:g}s",
                        what="timeout client")
    if extra:
        conf = _replace(conf, r"^defaults\n", rf"\g<0>    {extra}\n", what="defaults")
    return conf


def start_haproxy(upstream_url: str, *, variant: str = "shipped", read_timeout: float | None = None,
                  client_timeout: float | None = None, extra: str = "") -> Proxy:
    """HAProxy running the shipped haproxy.cfg in front of ``upstream_url``."""
    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-haproxy-"))
    port = free_port()
    config_path = workdir / "haproxy.cfg"
    config_path.write_text(haproxy_cfg(upstream_url, port=port, variant=variant, read_timeout=read_timeout,
                                       client_timeout=client_timeout, extra=extra))
    args = [HAPROXY, "-db", "-f", str(config_path)]
    return Proxy("haproxy", args, port=port, workdir=workdir, config_path=config_path)
