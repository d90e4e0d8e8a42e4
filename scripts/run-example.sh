#!/usr/bin/env bash
# Installs what is missing, then builds and runs the example fine-tune:
# an English word model adapted to French with LoRA (examples/finetune_words.cpp).
# Extra arguments go to the program (e.g. --quick, --rank 16, --device cuda).
#
#   scripts/run-example.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cmake --preset default >/dev/null
cmake --build --preset default --target finetune_words -j "$(nproc)"
exec build/default/examples/finetune_words "$@"
