#!/usr/bin/env bash
# Installs, builds and runs every test of nbdroot:
#   1. unit, integration and VM boot tests (ctest) on a -Werror build,
#   2. the unit and integration tests again with ASan and UBSan (the VM
#      boots test the node side, which the sanitizers do not reach),
#   3. each libFuzzer target for FUZZ_SECONDS (default 60).
# The VM boot tests (one VM suite at a time, about 15 minutes under TCG)
# run in the background from the first build on, beside steps 1-3: run one
# after the other they made the whole run 37 minutes on 2 cores. Their log
# is printed when they end.
# Ends with one line "N passed, N failed" over everything that ran.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
fuzz_seconds="${FUZZ_SECONDS:-60}"
jobs="${JOBS:-2}"

"$root/scripts/install-deps.sh" || { echo "dependency installation failed"; exit 1; }

passed=0
failed=0
count_ctest() {  # adds one ctest log's counts to the totals
  local line total bad
  line=$(grep -E "tests passed, [0-9]+ tests? failed out of [0-9]+" "$1" | tail -1)
  if [ -z "$line" ]; then failed=$((failed + 1)); return; fi
  bad=$(sed -E 's/.* ([0-9]+) tests? failed.*/\1/' <<<"$line")
  total=$(sed -E 's/.*out of ([0-9]+).*/\1/' <<<"$line")
  passed=$((passed + total - bad))
  failed=$((failed + bad))
}
run_ctest() {  # BUILD_DIR LOG [CTEST ARGS...]
  local dir="$1" log="$2"
  shift 2
  ctest --test-dir "$dir" --output-on-failure -j "$jobs" --timeout 2400 "$@" 2>&1 | tee "$log"
  count_ctest "$log"
}

logs="$(mktemp -d)"
e2e_pid=
echo "== build (-Werror)"
if BUILD_DIR="$root/build" scripts/build.sh -DNBDROOT_WERROR=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo; then
  echo "== VM boot tests: started in the background (their log comes at the end)"
  ctest --test-dir "$root/build" --output-on-failure -j "$jobs" --timeout 2400 -L e2e \
    >"$logs/ctest-e2e.log" 2>&1 </dev/null &
  e2e_pid=$!
  echo "== unit and integration tests"
  run_ctest "$root/build" "$logs/ctest.log" -LE e2e
else
  echo "build failed"; failed=$((failed + 1))
fi

echo "== build with AddressSanitizer and UndefinedBehaviorSanitizer"
if BUILD_DIR="$root/build-asan" scripts/build.sh -DNBDROOT_SANITIZE=ON -DNBDROOT_WERROR=ON \
     -DCMAKE_BUILD_TYPE=Debug; then
  echo "== unit and integration tests under ASan and UBSan"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    run_ctest "$root/build-asan" "$logs/ctest-asan.log" -LE e2e
else
  echo "sanitizer build failed"; failed=$((failed + 1))
fi

echo "== fuzzing, ${fuzz_seconds}s per target"
if tests/fuzz/run.sh "$fuzz_seconds" 2>&1 | tee "$logs/fuzz.log"; then
  n=$(grep -c "^   ok:" "$logs/fuzz.log" || true)
  passed=$((passed + ${n:-0}))
else
  failed=$((failed + 1))
fi

if [ -n "$e2e_pid" ]; then
  echo "== VM boot tests (waiting for them to end)"
  wait "$e2e_pid"
  cat "$logs/ctest-e2e.log"
  count_ctest "$logs/ctest-e2e.log"
fi

echo
echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
