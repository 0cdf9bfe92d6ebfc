#!/usr/bin/env bash
# Runs each libFuzzer target for a short time from its seed corpus (fuzz/corpus/<target>/).
# Usage: run-fuzz.sh BIN_DIR SECONDS_PER_TARGET
set -euo pipefail
bin=$1; secs=${2:-20}
root=$(cd "$(dirname "$0")/.." && pwd)
status=0
for t in fuzz_safetensors fuzz_pickle fuzz_zip fuzz_image fuzz_request fuzz_prompt; do
  work=$(mktemp -d)
  [ -d "$root/fuzz/corpus/$t" ] && cp -r "$root/fuzz/corpus/$t/." "$work/"
  echo "fuzz: $t for ${secs}s"
  if ! ASAN_OPTIONS=detect_leaks=1 "$bin/$t" -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
        -timeout=10 -print_final_stats=0 "$work" >"$work.log" 2>&1; then
    echo "fuzz: $t FAILED"; tail -40 "$work.log"; status=1
  else
    grep -E "^#[0-9]+.*DONE" "$work.log" | tail -1 || true
  fi
  rm -rf "$work" "$work.log"
done
exit $status
