#!/usr/bin/env bash
# Builds nbdroot into build/ (or $BUILD_DIR) with extra CMake arguments.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build" -G Ninja "$@" >/dev/null
ninja -C "$build"
