#!/usr/bin/env bash
# Ctrl-C on scripts/launch.sh stops every process it started: an interrupt
# to the launcher ends it with status 130 within a few seconds, and none of
# its processes is left running.
#
#   launch_interrupt.sh path/to/launch.sh
set -uo pipefail
launch=$1
marker="torchlora-launch-interrupt-$$"
# shellcheck source=tests/distributed/processes.sh
. "$(dirname "$0")/processes.sh"
running() { count_processes_named "$marker"; }
set -m # the launcher in a job of its own, as at a terminal
"$launch" 2 bash -c "exec -a $marker sleep 120" &
launcher=$!
sleep 1
started=$(running)
kill -INT "$launcher"
start=$SECONDS
wait "$launcher"
code=$?
elapsed=$((SECONDS - start))
sleep 0.5
left=$(running)
echo "launch_interrupt: $started processes started; launcher exit status $code after $elapsed s; $left left"
[ "$started" = 2 ] && [ "$code" = 130 ] && [ "$elapsed" -le 5 ] && [ "$left" = 0 ]
