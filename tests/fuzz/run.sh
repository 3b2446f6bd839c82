#!/usr/bin/env bash
# Builds the protocol fuzz targets with clang and runs each for SECONDS
# (default 60) over a scratch copy of its checked-in seed corpus.
#
#   tests/fuzz/run.sh [SECONDS]
#
# Exits non-zero when a build fails or a target crashes, leaks or times out;
# the reproducer is left in build-fuzz/artifacts/<target>/ and the last lines
# of the log are printed. BUILD_DIR overrides the build directory.
set -euo pipefail

secs=${1:-60}
case $secs in '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${BUILD_DIR:-$root/build-fuzz}
cxx=${CXX_FUZZ:-clang++}
targets=(fuzz_handshake fuzz_handshake_tls fuzz_transmission fuzz_client)

cmake -S "$root/tests/fuzz" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" -j"$(nproc)"

# One target: its log in $build/$t.log, its summary in $build/$t.result.
run_target() {
  local t=$1 work=$build/corpus/$1 artifacts=$build/artifacts/$1 log=$build/$1.log
  rm -rf "$work" "$artifacts"
  mkdir -p "$work" "$artifacts"
  cp "$root/tests/fuzz/corpus/$t/"* "$work/"
  if "$build/$t" -max_total_time="$secs" -timeout=25 -max_len=8192 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "$work" >"$log" 2>&1; then
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -1)
    echo "   ok: ${execs:-?} runs, $cov, corpus $(ls "$work" | wc -l) files" >"$build/$t.result"
  else
    echo "   FAILED (exit $?); log $log" >"$build/$t.result"
  fi
}

# The targets run side by side, one per core (FUZZ_JOBS overrides): each
# is single-threaded, and one at a time left the other core idle.
par=${FUZZ_JOBS:-$(nproc)}
case $par in '' | *[!0-9]* | 0) echo "FUZZ_JOBS=$par: expected a whole number from 1" >&2; exit 2 ;; esac
status=0
for ((i = 0; i < ${#targets[@]}; i += par)); do
  batch=("${targets[@]:i:par}")
  for t in "${batch[@]}"; do
    echo "== $t: ${secs}s"
    # A run that dies before it writes its summary (set -e in its
    # subshell) must not show an earlier run's.
    rm -f "$build/$t.result" "$build/$t.log"
    run_target "$t" &
  done
  wait
  for t in "${batch[@]}"; do
    echo "== $t"
    [ -f "$build/$t.result" ] || echo "   FAILED (no summary: the run stopped early); log $build/$t.log" >"$build/$t.result"
    cat "$build/$t.result"
    if grep -q '^   FAILED' "$build/$t.result"; then
      echo "   artifacts:" >&2
      ls -l "$build/artifacts/$t" >&2 || true
      tail -n 40 "$build/$t.log" >&2
      status=1
    fi
  done
done
exit $status
