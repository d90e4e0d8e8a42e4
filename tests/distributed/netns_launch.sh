#!/usr/bin/env bash
# Runs a program as two machines would: in two network namespaces of its
# own, joined by a veth pair, node 0 at 10.211.0.1 and node 1 at
# 10.211.0.2, each with its own loopback and nothing else (no route leaves
# them). In each, scripts/launch.sh starts node K of NODES:
#
#   netns_launch.sh [--private-dir DIR] [--master-name NAME] NODES LAUNCH
#                   PROGRAM [ARGS...]
#
#   LAUNCH --nnodes NODES --node-rank K --master-addr 10.211.0.1 \
#          --master-port 29500 1 PROGRAM ARGS...
#
# with "{node}" in ARGS replaced by K (separate folders per machine), and
# each node on its own half of this machine's cores (taskset), as on
# machines of their own. With
# --private-dir, node 1 sees DIR as an empty folder of its own (a tmpfs in
# its mount namespace), as on another machine: it cannot read node 0's
# files there, and whatever it writes there is listed and is a failure
# (only rank 0 may write). With --master-name, the master address is NAME,
# which node 0 resolves to 127.0.1.1 (as Debian's /etc/hosts maps a
# machine's own name) and node 1 to 10.211.0.1 (a hosts file per namespace
# under /etc/netns, removed afterwards). Nodes
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
private_dir=""
master_name=""
while [ "${1:-}" = --private-dir ] || [ "${1:-}" = --master-name ]; do
  if [ "$1" = --private-dir ]; then
    private_dir=${2:?--private-dir needs a folder}
  else
    master_name=${2:?--master-name needs a host name}
  fi
  shift 2
done
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
    if [ -n "$master_name" ]; then
      rm -rf "/etc/netns/$namespace"
    fi
  done
  # A pair made but not yet moved into the namespaces (Ctrl-C during the
  # setup) is still here; deleting one end removes both.
  ip link delete "${links[0]}" 2>/dev/null
  if [ -n "${made_etc_netns:-}" ]; then
    rmdir /etc/netns 2>/dev/null
  fi
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
# ip netns exec mounts /etc/netns/NAMESPACE/hosts over /etc/hosts.
name_the_master() {
  local node
  if [ ! -d /etc/netns ]; then
    made_etc_netns=1
  fi
  for node in 0 1; do
    mkdir -p "/etc/netns/${namespaces[$node]}" || return 1
    printf '127.0.0.1 localhost\n%s %s\n' \
      "$([ "$node" -eq 0 ] && echo 127.0.1.1 || echo "${addresses[0]}")" \
      "$master_name" >"/etc/netns/${namespaces[$node]}/hosts" || return 1
  done
}
if ! make_namespaces || { [ -n "$master_name" ] && ! name_the_master; }; then
  echo "$name: could not make the network namespaces" >&2
  exit 1
fi
echo "$name: node 0 in ${namespaces[0]} at ${addresses[0]}, node 1 in ${namespaces[1]} at ${addresses[1]}, $nodes nodes"

if [ -n "$private_dir" ]; then
  mkdir -p "$private_dir" || exit 1
fi
# Node 1's command: DIR hidden behind an empty tmpfs (ip netns exec gives
# it a mount namespace of its own), and a failure if it wrote there.
private_run='
  mount -t tmpfs torchlora-private "$0" || exit 1
  "$@"
  status=$?
  written=$(find "$0" -mindepth 1)
  if [ -n "$written" ]; then
    echo "netns_launch.sh: node 1 wrote into $0, which only rank 0 may write:" $written >&2
    [ "$status" -ne 0 ] || status=1
  fi
  exit "$status"'

# The cores this script may use ("0-3,8" in /proc), one by one.
cores=()
allowed=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
IFS=, read -r -a ranges <<<"$allowed"
for range in "${ranges[@]}"; do
  for ((core = ${range%-*}; core <= ${range#*-}; core++)); do
    cores+=("$core")
  done
done
half=$((${#cores[@]} / 2))
pids=()
for node in 0 1; do
  command=()
  if [ "$half" -ge 1 ]; then
    share="${cores[*]:$((node * half)):$half}"
    command=(taskset -c "${share// /,}")
  fi
  command+=(env -u GLOO_SOCKET_IFNAME -u MASTER_ADDR -u MASTER_PORT "$launch"
    --nnodes "$nodes" --node-rank "$node" --master-addr "${master_name:-${addresses[0]}}"
    --master-port 29500 1)
  for argument in "$@"; do
    command+=("${argument//\{node\}/$node}")
  done
  if [ -n "$private_dir" ] && [ "$node" -eq 1 ]; then
    command=(bash -c "$private_run" "$private_dir" "${command[@]}")
  fi
  ip netns exec "${namespaces[$node]}" "${command[@]}" &
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
