#!/usr/bin/env bash
# Runs one multi-process scenario and judges it:
#
#   run_scenario.sh pass|fail MAX_SECONDS PATTERN... -- COMMAND...
#
# passes when COMMAND exits with 0 (pass) or non-zero (fail), within
# MAX_SECONDS, and its output has a line matching each PATTERN (grep -E).
set -uo pipefail
expect=$1
max_seconds=$2
shift 2
patterns=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  patterns+=("$1")
  shift
done
shift
log=$(mktemp)
trap 'rm -f "$log"' EXIT
start=$SECONDS
TORCHLORA_LAUNCH_GRACE=${TORCHLORA_LAUNCH_GRACE:-3} "$@" >"$log" 2>&1
code=$?
elapsed=$((SECONDS - start))
cat "$log"
failed=0
if [ "$expect" = pass ] && [ "$code" -ne 0 ]; then
  echo "run_scenario: expected success, got exit status $code" >&2
  failed=1
fi
if [ "$expect" = fail ] && [ "$code" -eq 0 ]; then
  echo "run_scenario: expected a failure, got exit status 0" >&2
  failed=1
fi
if [ "$elapsed" -gt "$max_seconds" ]; then
  echo "run_scenario: took $elapsed s, more than $max_seconds s" >&2
  failed=1
fi
for pattern in "${patterns[@]}"; do
  if ! grep -Eq -- "$pattern" "$log"; then
    echo "run_scenario: no output line matches: $pattern" >&2
    failed=1
  fi
done
echo "run_scenario: exit status $code after $elapsed s"
exit "$failed"
