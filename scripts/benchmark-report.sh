#!/usr/bin/env bash
# Builds and runs the benchmarks with the settings of docs/performance.md and
# writes the report: docs/perf-<device>.json, -memory.json, -distributed.json
# and .svg, plus the tables on stdout. The device is cuda when a GPU is present, else cpu.
#
#   scripts/benchmark-report.sh [output-prefix]
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --preset default >/dev/null
cmake --build --preset default --target linear_benchmark distributed_benchmark -j "$(nproc)"
device=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  device=cuda
fi
prefix="${1:-docs/perf-${device}}"
mkdir -p "$(dirname "$prefix")"
build/default/benchmarks/linear_benchmark --report "$prefix" \
  --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
  --benchmark_enable_random_interleaving=true --benchmark_min_time=0.4
# Data-parallel steps: 1 and 2 processes in one run, on this machine.
scripts/launch.sh 2 build/default/benchmarks/distributed_benchmark \
  --report "${prefix}-distributed.json"
