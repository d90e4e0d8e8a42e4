#!/usr/bin/env bash
# scripts/launch.sh refuses bad arguments with exit status 2 and a message
# that names what it got, and starts nothing.
#
#   launch_arguments.sh path/to/launch.sh
set -uo pipefail
launch=$1
failed=0
expect() { # expect MESSAGE ARGUMENTS...
  local message=$1 output code
  shift
  output=$(bash "$launch" "$@" 2>&1)
  code=$?
  if [ "$code" -ne 2 ] || [[ "$output" != *"$message"* ]]; then
    echo "launch_arguments: '$*' gave status $code and: $output (expected 2 and: $message)"
    failed=1
  fi
}
expect "N a number of processes from 1 to 9999, got '0'" 0 true
expect "N a number of processes from 1 to 9999, got '10000'" 10000 true
expect "--nnodes must be a number of machines from 1 to 99999, got '99999999999999999999'" \
  --nnodes 99999999999999999999 --node-rank 0 --master-addr 10.0.0.1 1 true
expect "--node-rank must be a number from 0 to 1, got '2'" \
  --nnodes 2 --node-rank 2 --master-addr 10.0.0.1 1 true
expect "--nnodes 2 needs --master-addr" --nnodes 2 --node-rank 1 1 true
expect "--node-rank must be a number from 0 to 9, got '010'" \
  --nnodes 10 --node-rank 010 --master-addr 10.0.0.1 1 true
output=$(TORCHLORA_LAUNCH_GRACE=010 bash "$launch" 1 true 2>&1)
if [[ "$output" != *"TORCHLORA_LAUNCH_GRACE must be a whole number of seconds, got '010'"* ]]; then
  echo "launch_arguments: a grace of '010' (octal to bash) was not refused: $output"
  failed=1
fi
expect "the master port must be a port number from 1 to 65535, got '70000'" \
  --master-port 70000 1 true
expect "--master-addr needs a value" --master-addr
expect "unknown option '--nodes'" --nodes 2 1 true
# A good multi-machine command line sets torchrun's variables.
output=$(bash "$launch" --nnodes 3 --node-rank 2 --master-addr 10.0.0.1 2 \
  bash -c 'echo "$RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR $MASTER_PORT"' | sort)
expected=$'[rank 4] 4 0 6 2 10.0.0.1 29500\n[rank 5] 5 1 6 2 10.0.0.1 29500'
if [ "$output" != "$expected" ]; then
  echo "launch_arguments: node 2 of 3 got: $output (expected: $expected)"
  failed=1
fi
[ "$failed" -eq 0 ] && echo "launch_arguments: every bad argument refused, node ranks right"
exit "$failed"
