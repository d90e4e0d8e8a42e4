#!/usr/bin/env bash
# Installs what is missing, then builds and runs the example.
#
#   scripts/run-example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset default >/dev/null
cmake --build --preset default --target wrap_layer -j "$(nproc)"
build/default/examples/wrap_layer
