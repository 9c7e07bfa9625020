"""nginx in the benchmark: as a plain streaming proxy in front of the simulator (the class of
overhead tokenrelay aims at), and with the shipped ``deploy/nginx`` config in front of
tokenrelay (the deployment users run).

Each nginx runs in the foreground with its own prefix directory, one worker process (the
relays it is compared with are one process too), and no access log.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from .procs import ROOT, Server, free_port, nginx_binary

SHIPPED = ROOT / "deploy" / "nginx" / "tokenrelay.conf"

_MAIN = """\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 16000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
{body}
}}
"""

_PROXY = """\
    upstream sim {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
        location = /healthz {{ return 200 "ok"; }}
    }}
"""


def available() -> bool:
    return nginx_binary() is not None


def version() -> str | None:
    binary = nginx_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
    return out.split("/", 1)[-1] if "/" in out else out


def shipped_config() -> Path | None:
    return SHIPPED if SHIPPED.exists() else None


def _start(name: str, body: str, *, port: int, log_dir: Path) -> Server:
    prefix = Path(tempfile.mkdtemp(prefix=f"bench-{name.replace('+', '-')}-", dir=log_dir))
    conf = prefix / "nginx.conf"
    conf.write_text(_MAIN.format(prefix=prefix, body=body))
    binary = nginx_binary()
    assert binary is not None
    return Server(name, [binary, "-p", str(prefix), "-c", str(conf)], port=port, log_dir=log_dir,
                  ready_path="/healthz")


def start_proxy(log_dir: Path, *, upstream: str, name: str = "nginx") -> Server:
    """nginx as a plain streaming reverse proxy (``proxy_buffering off``) to ``upstream``."""
    port = free_port()
    upstream_port = int(upstream.rsplit(":", 1)[1].split("/")[0])
    return _start(name, _PROXY.format(port=port, upstream_port=upstream_port), port=port, log_dir=log_dir)


def start_shipped(log_dir: Path, *, relay_url: str, name: str = "nginx+tokenrelay") -> Server:
    """The shipped config, pointed at ``relay_url`` and listening on a free port.

    The shipped file is an ``http``-level snippet (upstream + server); its listen address
    and upstream server are rewritten, nothing else."""
    port = free_port()
    relay_port = relay_url.rsplit(":", 1)[1]
    text = SHIPPED.read_text()
    text = re.sub(r"server\s+127\.0\.0\.1:\d+", f"server 127.0.0.1:{relay_port}", text)
    text = re.sub(r"listen\s+[^;]+;", f"listen 127.0.0.1:{port};", text)
    return _start(name, text, port=port, log_dir=log_dir)
