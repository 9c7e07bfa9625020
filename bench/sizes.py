"""How big each workload is: the full run, ``--quick`` and the test suite's ``--smoke``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    name: str
    # W0: sequential direct/target pairs, a short answer with no delay; `w0_rounds` pairs
    # per target, in `w0_blocks` blocks
    w0_rounds: int
    w0_blocks: int
    w0_tokens: int
    # W1: streams × tokens × interval, `w1_waves` waves of `w1_streams` concurrent streams
    w1_streams: int
    w1_tokens: int
    w1_interval: float
    w1_waves: int
    # W2: no delay between tokens, at each concurrency for `w2_seconds`, split into
    # `w2_rounds` rounds that interleave the targets
    w2_tokens: int
    w2_concurrency: tuple[int, ...]
    w2_seconds: float
    w2_rounds: int
    # W3: many open streams, a token every `w3_interval` for `w3_seconds`
    w3_streams: tuple[int, ...]
    w3_interval: float
    w3_seconds: float
    w3_rate: float  # streams opened per second
    # W4: slow readers
    w4_readers: int
    w4_tokens: int
    w4_seconds: float
    w4_read_bytes: int
    w4_read_pause: float
    w4_send_timeout: float  # the relay's TOKENRELAY_SEND_TIMEOUT for W4's readers that never read
    # W5: --workers scaling on W2
    w5_workers: int
    w5_concurrency: int
    w5_seconds: float
    # W6: resumable streams on Redis: W0's pairs, W1 and W2 with and without Redis, and
    # Redis's connections with each number of readers of one stream
    w6_readers: tuple[int, ...] = (10, 200)


FULL = Sizes(
    name="full",
    w0_rounds=300, w0_blocks=5, w0_tokens=1,
    w1_streams=50, w1_tokens=200, w1_interval=0.020, w1_waves=8,
    w2_tokens=1000, w2_concurrency=(1, 16, 64, 256), w2_seconds=3.0, w2_rounds=3,
    w3_streams=(1000, 10_000), w3_interval=0.5, w3_seconds=30.0, w3_rate=250.0,
    w4_readers=100, w4_tokens=40_000, w4_seconds=8.0, w4_read_bytes=1024, w4_read_pause=0.1, w4_send_timeout=5.0,
    w5_workers=2, w5_concurrency=64, w5_seconds=3.0,
)

QUICK = Sizes(
    name="quick",
    w0_rounds=60, w0_blocks=2, w0_tokens=1,
    w1_streams=50, w1_tokens=100, w1_interval=0.020, w1_waves=1,
    w2_tokens=1000, w2_concurrency=(1, 16, 64), w2_seconds=1.5, w2_rounds=3,
    w3_streams=(1000,), w3_interval=0.5, w3_seconds=8.0, w3_rate=250.0,
    w4_readers=50, w4_tokens=40_000, w4_seconds=4.0, w4_read_bytes=1024, w4_read_pause=0.1, w4_send_timeout=3.0,
    w5_workers=2, w5_concurrency=64, w5_seconds=1.5,
    w6_readers=(10, 100),
)

SMOKE = Sizes(
    name="smoke",
    w0_rounds=5, w0_blocks=1, w0_tokens=1,
    w1_streams=6, w1_tokens=10, w1_interval=0.010, w1_waves=1,
    w2_tokens=200, w2_concurrency=(1, 4), w2_seconds=0.3, w2_rounds=1,
    w3_streams=(40,), w3_interval=0.1, w3_seconds=0.6, w3_rate=400.0,
    w4_readers=4, w4_tokens=5_000, w4_seconds=0.6, w4_read_bytes=1024, w4_read_pause=0.05, w4_send_timeout=1.0,
    w5_workers=2, w5_concurrency=4, w5_seconds=0.3,
    w6_readers=(2, 8),
)

PRESETS = {s.name: s for s in (FULL, QUICK, SMOKE)}
