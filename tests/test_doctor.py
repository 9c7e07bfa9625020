"""``tokenrelay doctor``, invoked for real against ``tokenrelay serve``: OK when it streams,
exit 2 when nothing answers, exit 1 when the URL is not tokenrelay; the JSON report's shape;
and the pieces it decides with (decoding compressed bytes split anywhere, naming the proxy)."""

from __future__ import annotations

import gzip
import zlib

import brotli
import orjson
import pytest
from click.testing import CliRunner
from proxies import start_caddy, start_haproxy, start_nginx
from servers import RelayServer, free_port

from tokenrelay.cli import cli
from tokenrelay.doctor import (
    Probe,
    Tick,
    _Decoder,
    _TickReader,
    detect_proxy,
    fixes_for,
    probe_url,
)

FAST = ["--ticks", "5", "--interval", "0.2"]


def doctor(*args: str):
    return CliRunner().invoke(cli, ["doctor", *args], catch_exceptions=False)


def test_ok_against_tokenrelay_itself(relay_server: RelayServer) -> None:
    result = doctor(relay_server.url, *FAST)
    assert result.exit_code == 0, result.output
    assert "plain text   OK" in result.stdout
    assert "SSE          OK" in result.stdout
    assert "5/5 ticks" in result.stdout
    assert "Result: OK" in result.stdout
    assert "PROBLEM" not in result.stdout


# --- through real proxies ----------------------------------------------------------------------

@pytest.mark.parametrize("start", [start_nginx, start_caddy, start_haproxy], ids=["nginx", "caddy", "haproxy"])
def test_ok_through_the_shipped_configs(relay_server: RelayServer, start) -> None:
    with start(relay_server.url) as proxy:
        result = doctor(proxy.url, *FAST)
    assert result.exit_code == 0, result.output
    assert "plain text   OK" in result.stdout and "SSE          OK" in result.stdout
    assert "Result: OK" in result.stdout


def test_buffered_through_the_control_nginx(relay_server: RelayServer) -> None:
    """gzip on and nginx told to disregard the app's X-Accel-Buffering: everything at the end."""
    with start_nginx(relay_server.url, variant="control") as proxy:
        result = doctor(proxy.url, "--direct", relay_server.url, *FAST)
    assert result.exit_code == 1, result.output
    out = result.stdout
    assert "plain text   BUFFERED" in out and "SSE          BUFFERED" in out
    assert "proxy        nginx (server: nginx/" in out
    assert ("PROBLEM: The plain-text and SSE streams are BUFFERED (in each, all 5 ticks arrived together "
            "at the end, about 0.8") in out
    assert "compressed (gzip), the likely cause" in out
    assert "fix (nginx): nginx compresses this stream: `gzip off;`" in out
    assert "fix (nginx): In the location that proxies tokenrelay: `proxy_buffering off;`" in out
    assert "the buffering is in the proxy between" in out
    assert "Result: 1 problem found (exit 1)." in out


def test_compressed_but_flushed_is_ok_json(relay_server: RelayServer) -> None:
    """gzip on, buffering on, but nginx obeys X-Accel-Buffering: compressed pieces, on time."""
    with start_nginx(relay_server.url, variant="gzip") as proxy:
        result = doctor(proxy.url, "--json", *FAST)
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert report["proxy"]["name"] == "nginx"
    for probe in report["probes"]:
        assert probe["verdict"] == "ok" and probe["content_encoding"] == "gzip"
        assert probe["ticks_received"] == 5 and probe["raw_chunks"] >= 5
        assert probe["holdback_s"] < 0.5 * probe["sent_spread_s"]
    assert {f["code"] for f in report["findings"]} == {"compressed_text", "compressed_sse"}


def test_idle_cut_by_a_short_read_timeout(relay_server: RelayServer) -> None:
    with start_nginx(relay_server.url, read_timeout=2) as proxy:
        result = doctor(proxy.url, "--idle", "8", "--json", *FAST)
    assert result.exit_code == 1, result.output
    report = orjson.loads(result.stdout)
    assert all(p["verdict"] == "ok" for p in report["probes"])
    idle = report["idle"]
    assert idle["cut"] is True and idle["ticks_received"] == 1
    assert 1.5 < idle["cut_after_s"] < 5, idle
    [finding] = [f for f in report["findings"] if f["severity"] == "problem"]
    assert finding["code"] == "idle_cut"
    assert "after 2." in finding["message"] or "after 1.9" in finding["message"]
    assert any("proxy_read_timeout" in fix for fix in finding["fixes"])


def test_idle_cut_behind_a_buffering_nginx(relay_server: RelayServer) -> None:
    """The proxy holds the first tick too: the silence still counts from the request."""
    with start_nginx(relay_server.url, variant="control", read_timeout=2) as proxy:
        result = doctor(proxy.url, "--idle", "8", "--json", "--proxy", "ingress-nginx", *FAST)
    assert result.exit_code == 1, result.output
    report = orjson.loads(result.stdout)
    assert report["proxy"] == {"name": "ingress-nginx", "evidence": "given with --proxy"}
    assert report["idle"]["cut"] is True
    assert 1.5 < report["idle"]["cut_after_s"] < 5, report["idle"]
    codes = {f["code"] for f in report["findings"] if f["severity"] == "problem"}
    assert codes == {"buffered", "idle_cut"}
    fixes = " ".join(fix for f in report["findings"] for fix in f["fixes"])
    assert "nginx.ingress.kubernetes.io/proxy-buffering" in fixes
    assert "nginx.ingress.kubernetes.io/proxy-read-timeout" in fixes


def test_unreachable_exits_2() -> None:
    result = doctor(f"http://127.0.0.1:{free_port()}/", *FAST)
    assert result.exit_code == 2
    assert "UNREACHABLE" in result.stdout
    assert "Connection refused" in result.stdout


def test_a_url_that_is_not_tokenrelay_is_a_problem(relay_server: RelayServer) -> None:
    result = doctor(relay_server.url + "/static/", *FAST)
    assert result.exit_code == 1
    assert "answered 404 without tokenrelay's probe" in result.stdout


def test_a_service_with_client_keys_needs_key(start_relay) -> None:
    relay = start_relay(upstream=None, TOKENRELAY_API_KEYS="tr-doctor-test-key")
    refused = doctor(relay.url, *FAST)
    assert refused.exit_code == 1
    assert "requires a client key" in refused.stdout and "--key" in refused.stdout
    result = doctor(relay.url, "--key", "tr-doctor-test-key", *FAST)
    assert result.exit_code == 0, result.output
    assert "Result: OK" in result.stdout


def test_json_report(relay_server: RelayServer) -> None:
    result = doctor(relay_server.url, "--json", "--direct", relay_server.url, "--idle", "1", *FAST)
    assert result.exit_code == 0, result.output
    report = orjson.loads(result.stdout)
    assert report["ok"] is True and report["exit_code"] == 0 and report["reachable"] is True
    assert report["proxy"]["name"] == "generic"
    assert report["hops"] == {"server": "uvicorn"}
    assert [p["mode"] for p in report["probes"]] == ["text", "sse"]
    for probe in report["probes"] + report["direct"]["probes"]:
        assert probe["verdict"] == "ok"
        assert probe["status"] == 200 and probe["http_version"] == "HTTP/1.1"
        assert probe["ticks_received"] == probe["ticks_expected"] == 5
        assert 0.6 < probe["arrival_spread_s"] < 1.4
        assert probe["holdback_s"] < 0.4
        assert probe["first_byte_s"] < 1
        assert probe["content_encoding"] is None
        assert len(probe["arrivals_s"]) == 5
    assert report["idle"]["cut"] is False and report["idle"]["ticks_received"] == 2
    assert {f["code"] for f in report["findings"]} == {"idle_ok", "direct_ok"}
    assert all(f["severity"] == "note" for f in report["findings"])


def test_unreachable_json() -> None:
    result = doctor(f"http://127.0.0.1:{free_port()}/", "--json")
    assert result.exit_code == 2
    report = orjson.loads(result.stdout)
    assert report["reachable"] is False and report["findings"][0]["code"] == "unreachable"


def test_help_explains_every_option() -> None:
    result = CliRunner().invoke(cli, ["doctor", "--help"])
    assert result.exit_code == 0
    for option in ("--direct", "--idle", "--json", "--proxy", "--ticks", "--interval", "--key", "Exit status"):
        assert option in result.stdout


# --- the pieces --------------------------------------------------------------------------------

BODY = b"".join(b"tick seq=%d of=6 t=%.3f sent=1764000000.%06d\n" % (n, n * 0.25, n) for n in range(1, 7))


def _brotli(data: bytes) -> bytes:
    return bytes(brotli.compress(data))


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        (None, lambda b: b),
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send it
        ("br", _brotli),
    ],
)
def test_ticks_are_found_in_compressed_bytes_split_anywhere(encoding: str | None, compress) -> None:
    raw = compress(BODY)
    for size in (1, 2, 3, 7, len(raw)):
        decoder = _Decoder(encoding)
        reader = _TickReader("text")
        seen = []
        for i in range(0, len(raw), size):
            seen += reader.feed(decoder.decompress(raw[i:i + size]))
        assert [seq for seq, _ in seen] == [1, 2, 3, 4, 5, 6], (encoding, size)


def test_unknown_encoding_falls_back_to_raw_timing() -> None:
    decoder = _Decoder("zstd")
    assert decoder.decompress is None and "zstd" in (decoder.note or "")


def probe_with(arrivals: list[float], *, interval: float = 0.25) -> Probe:
    ticks = [Tick(seq=n + 1, sent_t=n * interval, arrived=a) for n, a in enumerate(arrivals)]
    return Probe(mode="text", url="x", status=200, headers={"x-tokenrelay-probe": "0"}, ticks=ticks,
                 expected_ticks=len(ticks), complete=True)


def test_buffered_means_held_back_for_half_the_spread_or_more() -> None:
    assert probe_with([0.1, 0.35, 0.6, 0.85, 1.1]).verdict == "ok"
    assert probe_with([0.1, 0.5, 0.6, 0.85, 1.1]).verdict == "ok", "jitter is not buffering"
    assert probe_with([1.1, 1.1, 1.1, 1.1, 1.1]).verdict == "buffered", "all at the end"
    assert probe_with([0.6, 0.6, 0.6, 0.85, 1.1]).verdict == "buffered", "the first half held"


@pytest.mark.parametrize(
    ("headers", "name"),
    [
        ({"server": "nginx/1.22.1"}, "nginx"),
        ({"server": "nginx"}, "nginx"),
        ({"server": "Caddy"}, "caddy"),
        ({"via": "1.1 Caddy", "server": "uvicorn"}, "caddy"),
        ({"server": "cloudflare", "cf-ray": "8a1b2c3d4e5f-AMS"}, "cloudflare"),
        ({"via": "1.1 abc.cloudfront.net (CloudFront)", "x-amz-cf-id": "x"}, "aws"),
        ({"server": "awselb/2.0"}, "aws"),
        ({"server": "haproxy"}, "haproxy"),
        ({"server": "uvicorn"}, "generic"),
        ({}, "generic"),
    ],
)
def test_the_proxy_is_named_from_the_headers(headers: dict[str, str], name: str) -> None:
    assert detect_proxy(headers).name == name


def test_every_proxy_has_a_fix_for_every_problem() -> None:
    for proxy in ("nginx", "ingress-nginx", "caddy", "haproxy", "cloudflare", "aws", "generic"):
        for problem in ("buffered", "compressed", "idle"):
            assert fixes_for(proxy, problem), (proxy, problem)


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("https://chat.example.com", "https://chat.example.com/api/probe?ticks=8"),
        ("https://chat.example.com/", "https://chat.example.com/api/probe?ticks=8"),
        ("https://example.com/chat/", "https://example.com/chat/api/probe?ticks=8"),
        ("https://example.com/api/probe", "https://example.com/api/probe?ticks=8"),
        ("localhost:8000", "http://localhost:8000/api/probe?ticks=8"),
    ],
)
def test_probe_url(base: str, expected: str) -> None:
    assert probe_url(base, ticks=8) == expected
