#!/usr/bin/env bash
# Runs a program as two machines would: in two network namespaces of its
# own, joined by a veth pair, node 0 at 10.211.0.1 and node 1 at
# 10.211.0.2, each with its own loopback and nothing else (no route leaves
# them). In each, scripts/launch.sh starts node K of NODES:
#
#   netns_launch.sh NODES LAUNCH PROGRAM [ARGS...]
#
#   LAUNCH --nnodes NODES --node-rank K --master-addr 10.211.0.1 \
#          --master-port 29500 1 PROGRAM ARGS...
#
# with "{node}" in ARGS replaced by K (separate folders per machine). Nodes
# 2 and up are never started. No Gloo variable is passed on. Output lines
# keep launch.sh's "[rank K]" prefix. The exit status is the first
# failure's, or 0; once a node has failed, the other gets
# TORCHLORA_NETNS_GRACE seconds (default 40) to report it before it is
# killed.
#
# Making namespaces needs root: as another user it prints a line starting
# with "SKIPPED:" and exits 0. The namespaces (and every process left in
# them) are removed however it ends, Ctrl-C included.
set -uo pipefail

name=netns_launch.sh
if [ $# -lt 3 ] || ! [[ "$1" =~ ^[2-9]$ ]]; then
  echo "$name: usage: $name NODES LAUNCH PROGRAM [ARGS...] (NODES from 2 to 9, got '${1:-}')" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "SKIPPED: making network namespaces needs root; running as uid $(id -u)"
  exit 0
fi
if ! command -v ip >/dev/null 2>&1; then
  echo "$name: needs the ip command (Debian: iproute2; scripts/install-deps.sh installs it)" >&2
  exit 1
fi
nodes=$1
launch=$2
shift 2
grace=${TORCHLORA_NETNS_GRACE:-40}

tag="$$"
namespaces=("torchlora-$tag-0" "torchlora-$tag-1")
links=("tlora$tag-0" "tlora$tag-1")
addresses=(10.211.0.1 10.211.0.2)

cleanup() {
  local namespace pids
  for namespace in "${namespaces[@]}"; do
    pids=$(ip netns pids "$namespace" 2>/dev/null)
    if [ -n "$pids" ]; then
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null
    fi
    ip netns delete "$namespace" 2>/dev/null
  done
  wait 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

make_namespaces() {
  local node
  ip netns add "${namespaces[0]}" || return 1
  ip netns add "${namespaces[1]}" || return 1
  ip link add "${links[0]}" type veth peer name "${links[1]}" || return 1
  for node in 0 1; do
    ip link set "${links[$node]}" netns "${namespaces[$node]}" || return 1
    ip -n "${namespaces[$node]}" address add "${addresses[$node]}/30" \
      dev "${links[$node]}" || return 1
    ip -n "${namespaces[$node]}" link set "${links[$node]}" up || return 1
    ip -n "${namespaces[$node]}" link set lo up || return 1
  done
}
if ! make_namespaces; then
  echo "$name: could not make the network namespaces" >&2
  exit 1
fi
echo "$name: node 0 in ${namespaces[0]} at ${addresses[0]}, node 1 in ${namespaces[1]} at ${addresses[1]}, $nodes nodes"

pids=()
for node in 0 1; do
  arguments=()
  for argument in "$@"; do
    arguments+=("${argument//\{node\}/$node}")
  done
  ip netns exec "${namespaces[$node]}" env -u GLOO_SOCKET_IFNAME -u MASTER_ADDR \
    -u MASTER_PORT "$launch" --nnodes "$nodes" --node-rank "$node" \
    --master-addr "${addresses[0]}" --master-port 29500 1 "${arguments[@]}" &
  pids+=($!)
done

status=0
remaining=2
declare -A finished=()
deadline=""
while [ "$remaining" -gt 0 ]; do
  for pid in "${pids[@]}"; do
    if [ -n "${finished[$pid]:-}" ] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    wait "$pid"
    code=$?
    finished[$pid]=1
    remaining=$((remaining - 1))
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      deadline=$((SECONDS + grace))
    fi
  done
  if [ -n "$deadline" ] && [ "$remaining" -gt 0 ] && [ "$SECONDS" -ge "$deadline" ]; then
    echo "$name: killing the node still running $grace s after the first failure" >&2
    break
  fi
  [ "$remaining" -gt 0 ] && sleep 0.1
done
exit "$status"
