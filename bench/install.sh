#!/bin/sh
# What bench/suite.py needs beyond the project's own tools: wrk and h2load
# (Debian: wrk, nghttp2-client), haproxy and nginx (the proxy hops warm.py
# measures the runner against), Cloudflare's workerd (npm, pinned in
# bench/package-lock.json) and @deno/eszip (tools/eszip). suite.py
# does the same by itself when something is missing; this is for doing it
# ahead of time (or as root, for the Debian packages).
set -eu
cd "$(dirname "$0")"
for tool in wrk:wrk h2load:nghttp2-client haproxy:haproxy nginx:nginx; do
  { command -v "${tool%%:*}" || [ -x "/usr/sbin/${tool%%:*}" ]; } >/dev/null 2>&1 && continue
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y "${tool#*:}" || { apt-get update && apt-get install -y "${tool#*:}"; }
  else
    echo "${tool%%:*} is missing: sudo apt-get install -y ${tool#*:}" >&2
    exit 1
  fi
done
# npm ci refuses when the registry (a mirror) lacks workerd's darwin/windows
# packages; npm install still follows the lock and the exact pin
npm ci --prefix . --no-audit --no-fund || npm install --prefix . --no-audit --no-fund
ls node_modules/@cloudflare/workerd-*/bin/workerd
npm ci --prefix ../tools/eszip --no-audit --no-fund --loglevel=error
