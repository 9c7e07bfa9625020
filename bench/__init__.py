"""tokenrelay's benchmark: what the relay adds to a stream, against the simulator directly,
nginx, a minimal relay and the gateways users would pick instead. Run ``python -m bench``."""
