#!/usr/bin/env bash
# Re-vendor the chat page's third-party code at the versions pinned in
# scripts/web-vendor/package-lock.json: the page is static files that work offline, and the
# wheel needs no node at install time, so the built files live in the package itself.
# Bump a version: edit scripts/web-vendor/package.json, run `npm install` there, then this.
set -euo pipefail
cd "$(dirname "$0")/web-vendor"
npm ci --no-audit --no-fund --silent
out=../../src/tokenrelay/web/vendor
mkdir -p "$out"
smd=node_modules/streaming-markdown
cp "$smd/smd.min.js" "$out/smd.min.js"
cp "$smd/license" "$out/smd.LICENSE"
version=$(node -p "require('./$smd/package.json').version")
echo "streaming-markdown $version" > "$out/VERSIONS"
rm -rf node_modules
echo "vendored into src/tokenrelay/web/vendor: $(tr '\n' ' ' < "$out/VERSIONS")"
