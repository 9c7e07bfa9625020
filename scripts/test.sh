#!/usr/bin/env bash
# Install everything tokenrelay's tests need, then run the whole suite.
# Usage: bash scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

# Real servers and a real browser from Debian's packages.
packages=(chromium nginx redis-server caddy haproxy nodejs npm openssl)
commands=(chromium nginx redis-server caddy haproxy node npm openssl)
missing=()
for i in "${!commands[@]}"; do
  command -v "${commands[$i]}" >/dev/null 2>&1 || [ -x "/usr/sbin/${commands[$i]}" ] || missing+=("${packages[$i]}")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# tokenrelay and its test dependencies in the project's own environment.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[test]"

# The Node packages the tests use (the openai SDK, axe-core for the page), exactly as the lockfile says.
(cd tests/node && npm ci --no-audit --no-fund --silent)

exec .venv/bin/python -m pytest "$@"
