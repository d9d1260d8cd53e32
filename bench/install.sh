#!/bin/sh
# What bench/suite.py needs beyond the project's own tools: wrk (Debian) and
# Cloudflare's workerd (npm, pinned in bench/package-lock.json). suite.py
# does the same by itself when something is missing; this is for doing it
# ahead of time (or as root, for wrk).
set -eu
cd "$(dirname "$0")"
if ! command -v wrk >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }
  else
    echo "wrk is missing: sudo apt-get install -y wrk" >&2
    exit 1
  fi
fi
# npm ci refuses when the registry (a mirror) lacks workerd's darwin/windows
# packages; npm install still follows the lock and the exact pin
npm ci --prefix . --no-audit --no-fund || npm install --prefix . --no-audit --no-fund
ls node_modules/@cloudflare/workerd-*/bin/workerd
