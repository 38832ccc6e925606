#!/usr/bin/env bash
# A headless Chromium for the report's browser test: found, or installed from Debian's packages where
# apt-get runs as root; otherwise one line saying the test will be skipped. Never fails the build.
set -u
for name in "${CHROMIUM:-}" chromium chromium-browser google-chrome; do
    if [ -n "$name" ] && command -v "$name" >/dev/null 2>&1; then
        exit 0
    fi
done
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    if apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; then
        echo "installed chromium (Debian) for the report's browser test"
        exit 0
    fi
fi
echo "no Chromium: tests/test_report.py's browser test will be skipped (apt-get install chromium, or set CHROMIUM)"
