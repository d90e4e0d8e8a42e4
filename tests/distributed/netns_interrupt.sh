#!/usr/bin/env bash
# Ctrl-C on netns_launch.sh removes what it made: an interrupt while both
# nodes run ends it with status 130 within a few seconds, and afterwards
# none of its namespaces, veth links or processes is left.
#
#   netns_interrupt.sh path/to/netns_launch.sh path/to/launch.sh
set -uo pipefail
netns_launch=$1
launch=$2
if [ "$(id -u)" -ne 0 ]; then
  echo "SKIPPED: making network namespaces needs root; running as uid $(id -u)"
  exit 0
fi
marker="torchlora-netns-interrupt-$$"
# shellcheck source=tests/distributed/processes.sh
. "$(dirname "$0")/processes.sh"
running() { count_processes_named "$marker"; }
set -m # in a job of its own, as at a terminal
bash "$netns_launch" 2 "$launch" bash -c "exec -a $marker sleep 120" &
launcher=$!
for _ in $(seq 1 50); do
  [ "$(running)" = 2 ] && break
  sleep 0.1
done
started=$(running)
namespace="torchlora-$launcher-"
made=$(ip netns list | grep -c "^$namespace")
kill -INT "$launcher"
start=$SECONDS
wait "$launcher"
code=$?
elapsed=$((SECONDS - start))
sleep 0.5
left=$(running)
namespaces_left=$(ip netns list | grep -c "^$namespace")
links_left=$(ip -o link show | grep -c "tlora$launcher-")
echo "netns_interrupt: $made namespaces and $started processes made; exit status $code after $elapsed s; $namespaces_left namespaces, $links_left links and $left processes left"
[ "$made" = 2 ] && [ "$started" = 2 ] && [ "$code" = 130 ] && [ "$elapsed" -le 5 ] &&
  [ "$left" = 0 ] && [ "$namespaces_left" = 0 ] && [ "$links_left" = 0 ]
