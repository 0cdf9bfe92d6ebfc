#!/usr/bin/env bash
# Installs the Debian 12 packages diffuse builds with, when any is missing, and the web UI test's
# npm packages (tests/web). Idempotent.
set -euo pipefail
pkgs=(build-essential cmake pkg-config libdnnl-dev libpng-dev libjpeg-dev zlib1g-dev libutf8proc-dev
      nlohmann-json3-dev libcli11-dev libcpp-httplib-dev libgtest-dev libgmock-dev libbenchmark-dev
      clang-14 libclang-rt-14-dev libomp-14-dev
      chromium)  # the web UI test's browser (tests/web/ui_test.mjs)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -ne 0 ]; then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# playwright-core for the web UI test, as package-lock.json pins it (no browser download: the
# test drives Debian's chromium). Without npm the test skips.
web="$(cd "$(dirname "$0")/.." && pwd)/tests/web"
if [ ! -d "$web/node_modules/playwright-core" ]; then
  if command -v npm >/dev/null 2>&1; then
    echo "installing the web UI test's npm packages in $web" >&2
    # Not fatal: `make demo` and the other tests do not need it (the web UI test then skips).
    (cd "$web" && npm ci --no-audit --no-fund) || echo "note: npm ci failed; the web UI test (web_ui) will be skipped" >&2
  else
    echo "note: npm not found; the web UI test (web_ui) will be skipped" >&2
  fi
fi
