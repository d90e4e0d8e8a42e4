#!/usr/bin/env bash
# Installs what is missing, then builds and runs every test (the workflow
# preset "default": configure, build, ctest).
#
#   scripts/run-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cmake --workflow --preset default
