"""tokenrelay: stream an LLM's answer from a model API to browsers and programs.

\b
Start the service (offline, on the built-in simulator, when no upstream is set):
    tokenrelay serve
Ask it something from the terminal; the answer prints as it is written:
    tokenrelay ask "Why do proxies buffer streams?"

\b
Point it at a real model API with the environment (or a TOML file, --config):
    TOKENRELAY_UPSTREAM_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-… \\
    TOKENRELAY_MODEL=gpt-4o-mini tokenrelay serve
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson

from .config import Settings, SettingsError, default_text, load_settings, settings_help, unknown_env
from .doctor import PROXIES
from .logs import setup_logging

F = TypeVar("F", bound=Callable[..., Any])


@click.group(help=__doc__)
@click.version_option(package_name="tokenrelay")
def cli() -> None:
    pass


def _settings(config: Path | None, **overrides: Any) -> Settings:
    """The settings for a command whose flags are named after the settings they override
    (``port`` is ``--port``); a bad flag is a usage error naming it."""
    for warning in unknown_env():
        click.echo(f"warning: {warning}", err=True)
    try:
        return load_settings(config, **overrides)
    except SettingsError as exc:
        flagged = [problem for problem in exc.problems if problem.source == "flag"]
        if flagged:
            ctx = click.get_current_context()
            param = next((p for p in ctx.command.params if p.name == flagged[0].setting), None)
            raise click.BadParameter(flagged[0].message, ctx=ctx, param=param,
                                     param_hint=None if param else flagged[0].where) from None
        raise click.ClickException(str(exc)) from None


def _setting_option(name: str, *decls: str, **kwargs: Any) -> Callable[[F], F]:
    """A flag overriding a setting, described by the setting itself."""
    field = Settings.model_fields[name]
    return click.option(*decls, name, default=None,
                        help=f"{field.description}  [default: {default_text(field)}]", **kwargs)


CONFIG_HELP = "A TOML file of settings: each TOKENRELAY_* name in lower case, without the prefix."
_DESCRIPTION_WIDTH = 70


def _serve_help() -> str:
    """serve's help: what it does, then every setting as config.py describes it."""
    parts = [
        "Serve the streaming API and the chat page.",
        "Settings come from flags, then TOKENRELAY_* environment variables, then the --config file, "
        "whose keys are the same names in lower case without TOKENRELAY_ (upstream_url = \"…\").",
    ]
    for title, entries in settings_help():
        lines = ["\b", f"{title}:"]
        for entry in entries:
            lines.append(f"  {' or '.join(entry.env)}  [default: {entry.default}]")
            lines.extend(textwrap.wrap(entry.description, _DESCRIPTION_WIDTH, initial_indent=" " * 6,
                                       subsequent_indent=" " * 6, break_on_hyphens=False))
        parts.append("\n".join(lines))
    parts.append(_SERVE_ROUTES)
    return "\n\n".join(parts)


_SERVE_ROUTES = """\
\b
Routes: GET / (chat page), POST /api/get-response (text, SSE with
'Accept: text/event-stream', or JSON with "stream": false), GET /api/info,
POST /v1/chat/completions and GET /v1/models (OpenAI-compatible, for the OpenAI SDKs),
GET /api/probe (timed ticks for `tokenrelay doctor`), GET /healthz (alive),
GET /readyz (upstream answers), GET /metrics (Prometheus),
POST /api/jobs, GET|DELETE /api/jobs/{id}, GET /api/jobs/{id}/stream."""


@cli.command(help=_serve_help())
@_setting_option("host", "--host")
@_setting_option("port", "--port", type=int)
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=CONFIG_HELP)
@_setting_option("log_level", "--log-level")
@_setting_option("log_json", "--log-json", is_flag=True)
@_setting_option("allow_public_without_keys", "--allow-public-without-keys", is_flag=True)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Server processes sharing the port (one event loop each); more than one uses more cores.")
def serve(host: str | None, port: int | None, config: Path | None, log_level: str | None,
          log_json: bool | None, allow_public_without_keys: bool | None, workers: int) -> None:
    import uvicorn

    from .app import create_app
    from .auth import load_keys
    from .serving import ConnectionLimits, default_max_connections, raise_fd_limit, uvicorn_options

    settings = _settings(config, host=host, port=port, log_level=log_level, log_json=log_json,
                         allow_public_without_keys=allow_public_without_keys)
    if not is_local_address(settings.host) and not settings.allow_public_without_keys and not load_keys(settings):
        raise click.ClickException(
            f"refusing to listen on {settings.host} without client keys: anyone who can reach it could use "
            "the upstream (and its API key) at your expense. Set TOKENRELAY_API_KEYS (or "
            "TOKENRELAY_API_KEYS_FILE), listen on 127.0.0.1, or pass --allow-public-without-keys "
            "(TOKENRELAY_ALLOW_PUBLIC_WITHOUT_KEYS=true) if that is what you mean.")
    setup_logging(settings.log_level, json=settings.log_json)
    label = f" in {workers} processes" if workers > 1 else ""
    from .upstreams import upstream_summary

    answers = f"{'routes' if settings.routes else 'upstream'}: {upstream_summary(settings)}"
    _check_port(settings.host, settings.port)
    click.echo(f"tokenrelay on http://{url_host(settings.host)}:{settings.port}/{label}  ({answers})", err=True)
    fd_limit = raise_fd_limit()  # before the workers start: they inherit it
    limits = ConnectionLimits(
        header_timeout=settings.header_timeout, body_timeout=settings.body_timeout,
        max_header_bytes=settings.max_header_bytes,
        max_connections=settings.max_connections or default_max_connections(fd_limit),
    )
    fast = fast_server()
    # The parser fast_server() picks, wrapped in the connection limits (serving.py).
    guarded = uvicorn_options(limits, fast.pop("http"), keepalive_timeout=settings.keepalive_timeout)
    limited = settings.max_concurrent_streams_per_key or settings.requests_per_minute_per_key
    if workers > 1 and limited and not settings.redis_url:
        click.echo(f"warning: each of the {workers} processes counts the per-key limits on its own; "
                   "set TOKENRELAY_REDIS_URL to count them once", err=True)
    if workers > 1:
        # Each worker process builds its own app from the environment: pass the flags on.
        from .app import CONFIG_FILE_ENV, SERVE_PROCESSES_ENV
        from .config import ENV_PREFIX

        for name, value in (("log_level", log_level), ("log_json", log_json)):
            if value is not None:
                os.environ[ENV_PREFIX + name.upper()] = str(value).lower()
        if config is not None:
            os.environ[CONFIG_FILE_ENV] = str(config.resolve())
        os.environ[SERVE_PROCESSES_ENV] = str(workers)  # jobs in SQLite need one process
        with _shared_metrics():
            uvicorn.run("tokenrelay.app:app_from_env", factory=True, workers=workers, host=settings.host,
                        port=settings.port, log_config=None, timeout_graceful_shutdown=5, **fast, **guarded)
        return
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_config=None,
        timeout_graceful_shutdown=5, **fast, **guarded,
    ))
    server.run()


def is_local_address(host: str) -> bool:
    """Whether listening on ``host`` keeps the service on this machine: a loopback address
    or ``localhost``. Anything else (0.0.0.0, ::, a LAN or public address) is reachable from
    the network."""
    import ipaddress

    if host.lower() in ("localhost", "localhost.") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def url_host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets (``http://[::]:8000/``)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@contextlib.contextmanager
def _shared_metrics() -> Iterator[None]:
    """/metrics adds up every worker: prometheus-client's multiprocess mode, in a fresh
    directory (or the one PROMETHEUS_MULTIPROC_DIR already names, left as it is)."""
    from .metrics import MULTIPROC_ENV

    if os.environ.get(MULTIPROC_ENV):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tokenrelay-metrics-") as path:
        os.environ[MULTIPROC_ENV] = path
        try:
            yield
        finally:
            del os.environ[MULTIPROC_ENV]


def _check_port(host: str, port: int) -> None:
    """Fail with one clear line when the server could not listen on ``host:port``, before
    the banner says it does. Bound as uvicorn binds (SO_REUSEADDR, so a port left in
    TIME_WAIT by the last run is free) and released at once for uvicorn to take."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    address = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise click.ClickException(f"cannot listen on {address}: unknown host ({exc.strerror})") from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                reason = "the port is in use (another program listens there)"
            elif exc.errno == errno.EACCES:
                reason = "permission denied (ports below 1024 need privileges)"
            elif exc.errno == errno.EADDRNOTAVAIL:
                reason = "no network interface of this machine has that address"
            else:
                reason = exc.strerror or str(exc)
            raise click.ClickException(f"cannot listen on {address}: {reason}") from None


def fast_server() -> dict[str, Any]:
    """uvloop and httptools when installed (they come with uvicorn[standard]); the pure
    Python event loop and parser otherwise. Named explicitly so a missing one is visible."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return {"loop": loop, "http": http}


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9000, show_default=True, help="Port to listen on.")
@click.option("--ttft", type=float, default=0.25, show_default=True, help="Seconds before the first token.")
@click.option("--tps", type=float, default=40.0, show_default=True, help="Tokens per second; 0: no delay.")
@click.option("--tokens", type=int, default=80, show_default=True, help="Answer length in tokens.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same answers.")
@click.option("--fault", default=None,
              help="Fault for every request: error-before, error-mid, stall, malformed, http-429, http-500.")
@click.option("--chat-only", is_flag=True,
              help="Serve no /v1/responses, as an upstream that has only chat completions.")
@click.option("--keepalive-timeout", type=click.IntRange(min=1), default=75, show_default=True,
              help="Seconds an idle client connection stays open. Longer than its clients keep one idle "
                   "(tokenrelay 15 s, nginx's upstream keepalive 60 s), as a hosted API's is, so a request "
                   "never meets a connection the simulator is just closing.")
@click.option("--log-level", default="warning", show_default=True)
def sim(host: str, port: int, ttft: float, tps: float, tokens: int, seed: int, fault: str | None,
        chat_only: bool, keepalive_timeout: int, log_level: str) -> None:
    """Run the simulator as an OpenAI-compatible API (POST /v1/chat/completions and
    POST /v1/responses), and as
    Anthropic's Messages API (POST /v1/messages, which like Anthropic's needs the headers
    x-api-key, any value, and anthropic-version: 2023-06-01).

    \b
    Any OpenAI client, or tokenrelay itself, can point at it:
      tokenrelay sim --port 9000 &
      TOKENRELAY_UPSTREAM_URL=http://127.0.0.1:9000/v1 tokenrelay serve

    \b
    Per request, options ride in the model name or an X-Sim-Options header:
      sim:echo                     repeat the last user message
      sim:ttft=2,tps=10,tokens=50  pacing and length
      sim:fault=error-mid          error-before | error-mid | stall | malformed | http-NNN
      sim:fault=stall,stall=5,at=3 go silent 5 s after 3 tokens
      sim:tools (or tools=2)       stream a tool call (also when the request has tools)
    Bounds per request: ttft 0–60 s, tps 0–1,000,000, stall 0–600 s, tokens 0–50,000,
    at 0–50,000, tools 0–16, seed 0–4,294,967,295; outside them the request is refused.
    GET /sim/stats counts open, completed and client-cancelled streams.
    """
    import uvicorn

    from .errors import ValidationFailed
    from .sim import SimOptions
    from .sim.openai_server import create_sim_app

    defaults = SimOptions(ttft=ttft, tps=tps, tokens=tokens, seed=seed)
    if fault:
        try:
            defaults = defaults.with_model(f"sim:fault={fault}")
        except ValidationFailed as exc:
            raise click.BadParameter(exc.message, param_hint="--fault") from None
    setup_logging(log_level)
    _check_port(host, port)
    click.echo(f"simulator on http://{host}:{port}/v1", err=True)
    app = create_sim_app(defaults, responses=not chat_only)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_config=None,
                                  timeout_keep_alive=keepalive_timeout, **fast_server())).run()


@cli.command()
@click.argument("question", required=False)
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, envvar="TOKENRELAY_URL",
              help="The tokenrelay service (env TOKENRELAY_URL).")
# Answers always come as Server-Sent Events now (they carry the ids a resume needs); the flag
# stays so that scripts written for it keep working.
@click.option("--sse", is_flag=True, hidden=True)
@click.option("--model", default=None, help="Model to ask (default: the service's).")
@click.option("--system", default=None, help="A system message to send first.")
@click.option("-v", "--verbose", is_flag=True, help="Print time to first token and tokens/s to stderr.")
@click.option("--key", default=None, envvar="TOKENRELAY_API_KEY",
              help="Client key, for a service that requires one (env TOKENRELAY_API_KEY).")
@click.option("--job", is_flag=True,
              help="Submit it as a job (POST /api/jobs) and wait for the answer, with a progress indicator.")
@click.option("--webhook-url", default=None, help="With --job: also have the answer sent to this URL.")
def ask(question: str | None, url: str, sse: bool, model: str | None, system: str | None,
        verbose: bool, key: str | None, job: bool, webhook_url: str | None) -> None:
    """Ask a question; print the answer as it arrives.

    The question is read from stdin when not given. A dropped connection is resumed where it
    broke off (one line on stderr says so), with nothing printed twice. Exits 1 with a message
    when the service refuses, the stream fails midway or cannot be resumed, 130 on Ctrl-C
    (which also stops the model).

    With --job the question becomes a job: the answer is printed when it is complete, and
    the job's id goes to stderr; Ctrl-C stops waiting but not the job.
    """
    from .ask import AskFailed, check_url, stream_answer

    problem = check_url(url)
    if problem:
        raise click.BadParameter(problem, param_hint="--url")
    if question is None:
        if sys.stdin.isatty():
            raise click.UsageError("give a question, or pipe one on stdin")
        question = sys.stdin.read().rstrip("\n")
    if not question.strip():
        raise click.UsageError("the question is empty")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}]
    body: dict[str, Any] = {"messages": messages}
    if model:
        body["model"] = model
    if job:
        _ask_job(url.rstrip("/"), body, webhook_url=webhook_url, verbose=verbose, key=key)
        return
    if webhook_url:
        raise click.UsageError("--webhook-url needs --job")
    out = _AnswerOut(sys.stdout)
    answer = _Answer(url.rstrip("/"), key, out)

    def note(line: str) -> None:
        # On a terminal, a note mid-answer would otherwise go on the answer's unfinished line.
        click.echo(("\n" if out.started and sys.stderr.isatty() else "") + line, err=True)

    previous = signal.signal(signal.SIGINT, answer.stop_and_leave)
    try:
        stats = stream_answer(url.rstrip("/") + "/api/get-response", body, write=out.write,
                              flush=out.flush, key=key, on_stream=answer.started, announce=note)
    except AskFailed as exc:
        out.end_line()  # a partial answer's last line ends before the error on stderr
        raise click.ClickException(str(exc)) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    out.write("\n")
    out.flush()
    if verbose:
        click.echo(stats.describe(), err=True)


@cli.command()
@click.argument("url")
@click.option("--direct", metavar="URL", default=None,
              help="The app's own address (e.g. http://10.0.0.5:8000), probed as well, to tell whether "
                   "the buffering is in the proxy.")
@click.option("--idle", type=click.FloatRange(min=1, max=900), metavar="SECONDS", default=None,
              help="Also keep a stream silent this long and report whether something cuts it, and when.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--proxy", type=click.Choice(PROXIES), default=None,
              help="Give the fixes for this proxy instead of the one detected from the headers.")
@click.option("--ticks", type=click.IntRange(2, 100), default=8, show_default=True,
              help="Ticks per probe.")
@click.option("--interval", type=click.FloatRange(0.05, 10), default=0.25, show_default=True,
              help="Seconds between ticks; raise it on a link whose latency jitters more than that.")
@click.option("--key", default=None, envvar="TOKENRELAY_API_KEY",
              help="Client key, for a tokenrelay that requires one (env TOKENRELAY_API_KEY).")
@click.option("--resume", is_flag=True,
              help="Also check that a dropped stream resumes through the proxy (asks the model a short "
                   "question: spends a few tokens).")
@click.option("--model", default=None, help="With --resume: the model to ask (default: the service's).")
def doctor(url: str, direct: str | None, idle: float | None, as_json: bool, proxy: str | None, ticks: int,
           interval: float, key: str | None, resume: bool, model: str | None) -> None:
    """Check that a deployed tokenrelay streams through whatever is in front of it.

    \b
      tokenrelay doctor https://chat.example.com/
      tokenrelay doctor https://chat.example.com/ --direct http://10.0.0.5:8000 --idle 90
      tokenrelay doctor https://chat.example.com/ --resume

    URL is where users reach tokenrelay (a path prefix is fine). doctor asks its probe route
    (GET /api/probe: timed ticks, no model call, no tokens spent) for a plain-text and an SSE
    stream, asking as a browser does (compression accepted), and times the raw bytes as they
    arrive. It reports whether the stream arrives piece by piece (OK) or held back and
    released together (BUFFERED), the time to first byte, compression, the HTTP version, the
    hops that the headers name, and for every problem the fix for the proxy it detected
    (nginx, ingress-nginx, Caddy, HAProxy, Cloudflare, AWS; generic advice otherwise).

    With --resume it also starts a short answer, drops its connection after a few events and
    resumes it (GET /api/streams/{id} with Last-Event-ID): OK when nothing is missing or
    repeated and the model went on meanwhile; FAILED with the fix otherwise (a proxy that
    drops Last-Event-ID, a reconnect that reached another instance without Redis, a resume
    grace of 0).

    \b
    Exit status: 0 streams fine, 1 a problem was found, 2 unreachable.
    """
    from .doctor import diagnose, render

    if not as_json:
        extra = f", then {idle:g} s of silence" if idle else ""
        if resume:
            extra += ", then a dropped stream resumed"
        click.echo(f"probing {url} (about {2 * (ticks - 1) * interval:.0f} s{extra})…", err=True)
    if model and not resume:
        raise click.UsageError("--model is for --resume")
    report = diagnose(url, direct=direct, idle=idle, proxy=proxy, ticks=ticks, interval=interval, key=key,
                      resume=resume, model=model)
    if as_json:
        click.echo(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render(report), nl=False)
    sys.exit(report.exit_code)


class _AnswerOut:
    """stdout for an answer, noting whether any of it was written: a failure before the
    first token leaves stdout empty, so a script sees no answer rather than a blank line."""

    def __init__(self, out: Any) -> None:
        self.out = out
        self.started = False

    def write(self, text: str) -> None:
        if text:
            self.started = True
            self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def end_line(self) -> None:
        if self.started:
            self.out.write("\n")
            self.out.flush()


class _Answer:
    """The answer ``ask`` is streaming, so that Ctrl-C can stop it."""

    def __init__(self, base: str, key: str | None, out: _AnswerOut) -> None:
        self.base, self.key, self.out = base, key, out
        self.stream_id: str | None = None

    def started(self, stream_id: str) -> None:
        self.stream_id = stream_id

    def stop_and_leave(self, signum: int, frame: Any) -> None:
        """Ctrl-C while an answer streams: stop the model, then leave at once. Leaving alone
        would not stop it: a stream outlives its connection for a while, so that a dropped
        connection can resume (docs/resume.md). Unwinding a KeyboardInterrupt through the HTTP
        client from wherever the signal landed could block in its connection pool, hence
        ``os._exit``."""
        with contextlib.suppress(Exception):
            self.out.end_line()
        if self.stream_id is not None:
            import httpx

            headers = {"authorization": f"Bearer {self.key}"} if self.key else {}
            with contextlib.suppress(Exception):
                httpx.delete(f"{self.base}/api/streams/{self.stream_id}", headers=headers, timeout=3)
        os.write(2, b"cancelled\n")
        os._exit(130)


def _ask_job(url: str, body: dict[str, Any], *, webhook_url: str | None, verbose: bool,
             key: str | None) -> None:
    import httpx

    from .ask import AskFailed, choose_model
    from .jobs import client

    if webhook_url:
        body["webhook_url"] = webhook_url
    if "model" not in body:  # as a streamed ask: the service's default, else the first model it lists
        try:
            choice = choose_model(url, key=key)
        except AskFailed as exc:
            raise click.ClickException(str(exc)) from None
        if choice.model is not None:
            body["model"] = choice.model
        if choice.note:
            click.echo(choice.note, err=True)
    tty = sys.stderr.isatty()

    def progress(status: str, elapsed: float, frame: str) -> None:
        if tty:
            click.echo(f"\r{frame} {status} {elapsed:5.1f} s ", err=True, nl=False)

    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(timeout=httpx.Timeout(30, connect=10), headers=headers) as http:
        try:
            created = client.submit(http, url, body)
            click.echo(f"job {created['id']} submitted", err=True)
            ended = client.wait(http, url, created["id"], progress=progress)
        except AskFailed as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo(f"\nstopped waiting; the job goes on: {url}/api/jobs/{created['id']}", err=True)
            sys.exit(130)
    if tty:
        click.echo("\r\033[K", err=True, nl=False)
    if ended["status"] != "succeeded":
        error = ended["error"] or {"type": "job_" + ended["status"], "message": f"the job {ended['status']}"}
        raise click.ClickException(f"job {ended['id']} {ended['status']}: {error['type']}: {error['message']}")
    sys.stdout.write(ended["result"]["text"] + "\n")
    sys.stdout.flush()
    if verbose:
        usage = ended["result"]["usage"] or {}
        click.echo(f"job {ended['id']}: {usage.get('completion_tokens', '?')} tokens, "
                   f"created {ended['created_at']}, finished {ended['finished_at']}", err=True)


@cli.command()
@click.option("--config", "config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=CONFIG_HELP)
@click.option("--concurrency", type=click.IntRange(min=1), default=None,
              help="Jobs this worker runs at once.  [default: TOKENRELAY_JOB_CONCURRENCY, "
                   f"{default_text(Settings.model_fields['job_concurrency'])}]")
@_setting_option("log_level", "--log-level")
def worker(config: Path | None, concurrency: int | None, log_level: str | None) -> None:
    """Run jobs from the Redis queue; start as many as you like, on any machine.

    \b
    They need the same settings as 'tokenrelay serve' (upstream or routes, model, webhooks):
      TOKENRELAY_REDIS_URL=redis://redis.internal:6379/0 \\
      TOKENRELAY_UPSTREAM_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-… \\
      TOKENRELAY_WEBHOOK_SECRET=whsec_… tokenrelay worker
    and 'tokenrelay serve' with the same TOKENRELAY_REDIS_URL takes the jobs in.
    TOKENRELAY_JOB_HEARTBEAT (10 s): a job whose worker is silent that long runs again
    elsewhere. SIGTERM or Ctrl-C stops the worker; its running jobs go back on the queue.
    """
    import asyncio

    from .jobs.distributed import describe_upstreams, make_worker

    settings = _settings(config, log_level=log_level)
    if settings.redis_url is None:
        raise click.ClickException("set TOKENRELAY_REDIS_URL (redis://host:6379/0): workers take jobs from Redis")
    setup_logging(settings.log_level, json=settings.log_json)
    click.echo(f"tokenrelay worker ({describe_upstreams(settings)})", err=True)
    asyncio.run(make_worker(settings, concurrency=concurrency, signals=True).start())


@cli.group()
def webhooks() -> None:
    """Tools for receiving tokenrelay's webhooks."""


@webhooks.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=9100, show_default=True, help="Port to listen on.")
@click.option("--secret", envvar="TOKENRELAY_WEBHOOK_SECRET", default=None,
              help="The service's signing secret (whsec_…; default: $TOKENRELAY_WEBHOOK_SECRET). "
                   "Without it signatures are not checked.")
@click.option("--fail-first", type=click.IntRange(min=0), default=0, show_default=True,
              help="Answer 500 to the first N deliveries, to watch the retries.")
def listen(host: str, port: int, secret: str | None, fail_first: int) -> None:
    """Receive webhooks locally: verify each signature, print each delivery.

    \b
    One line per delivery on stderr (webhook id, event, job, signature check, retries and
    duplicates),
    the payload as JSON on stdout. Point a job at it:
      tokenrelay webhooks listen --port 9100 &
      curl localhost:8000/api/jobs -H 'content-type: application/json' \\
        -d '{"messages":[{"role":"user","content":"hi"}],"webhook_url":"http://127.0.0.1:9100/"}'
    (the service needs TOKENRELAY_WEBHOOK_ALLOW_PRIVATE=true to deliver to loopback).
    Answers 204 to a delivery whose signature verifies, 401 to one that does not.
    """
    import orjson
    import uvicorn

    from .jobs.listen import Delivery, Receiver, create_listen_app

    def show(delivery: Delivery) -> None:
        payload = delivery.payload if isinstance(delivery.payload, dict) else {}
        data = payload.get("data") or {}
        check = "signature ok" if delivery.verified else ("SIGNATURE INVALID" if secret else "not verified")
        again = (f", retry #{delivery.attempt}" if delivery.retry
                 else f", duplicate #{delivery.attempt}" if delivery.duplicate else "")
        click.echo(f"{delivery.webhook_id} {payload.get('type', '?')} {data.get('id', '?')}: {check}{again}"
                   f" → {delivery.status}", err=True)
        click.echo(orjson.dumps(delivery.payload).decode())

    try:
        receiver = Receiver(secret, fail_first=fail_first, on_delivery=show)
    except Exception:
        raise click.BadParameter("not a Standard Webhooks secret (whsec_ and base64)", param_hint="--secret") from None
    if not secret:
        click.echo("no --secret: signatures are not checked", err=True)
    _check_port(host, port)
    click.echo(f"listening for webhooks on http://{host}:{port}/", err=True)
    uvicorn.Server(uvicorn.Config(create_listen_app(receiver), host=host, port=port, log_config=None,
                                  log_level="warning")).run()


@webhooks.command("secret")
def new_secret() -> None:
    """Print a new signing secret for TOKENRELAY_WEBHOOK_SECRET: 'whsec_' and the base64 of
    32 random bytes. Give the same secret to the receivers, which check signatures with it.

    \b
      export TOKENRELAY_WEBHOOK_SECRET=$(tokenrelay webhooks secret)
    """
    import base64
    import secrets

    from .config import WEBHOOK_SECRET_BYTES

    low, high = WEBHOOK_SECRET_BYTES
    click.echo("whsec_" + base64.b64encode(secrets.token_bytes(min(max(32, low), high))).decode())
