#!/usr/bin/env bash
# Installs what is missing, then builds and runs every test (the workflow
# preset "default": configure, build, ctest).
#
#   scripts/run-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# The tests run in parallel too; those that must run alone (timings, network
# namespaces) say so in their CMake properties.
export CTEST_PARALLEL_LEVEL="${CTEST_PARALLEL_LEVEL:-$(nproc)}"
cmake --workflow --preset default
