#!/usr/bin/env bash
# Starts the processes of a program the torchrun way, without Python: each
# gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and
# MASTER_PORT. Each process's output and errors go to standard output,
# every line prefixed with "[rank K]". As torchrun does, OMP_NUM_THREADS is
# 1 unless set (several processes each with a full thread pool would fight
# over the cores; OpenBLAS reads it too).
#
# On one machine: N local processes, MASTER_ADDR 127.0.0.1 (nothing leaves
# the machine) and a free MASTER_PORT (or the MASTER_PORT already set).
#
#   scripts/launch.sh 2 build/default/examples/finetune_words --distributed
#
# On several machines, as torchrun's --nnodes, --node-rank and
# --master-addr: run it once on each machine, with the same node count,
# master address and port everywhere and each machine's own node rank.
# Node 0 runs ranks 0 to N-1 and serves the store at the master address
# (one of its own addresses that the others reach); node K runs ranks K*N
# to K*N+N-1. The port is --master-port, else MASTER_PORT, else 29500, and
# must be free on node 0 and open between the machines.
#
#   machine A (10.0.0.1): scripts/launch.sh --nnodes 2 --node-rank 0 \
#                           --master-addr 10.0.0.1 2 program args...
#   machine B:            scripts/launch.sh --nnodes 2 --node-rank 1 \
#                           --master-addr 10.0.0.1 2 program args...
#
# Each process runs in a process group of its own: Ctrl-C (INT) or TERM to
# the launcher stops every process and what they started (TERM, then KILL
# 10 s later). When one process fails, the others get TORCHLORA_LAUNCH_GRACE
# seconds (a whole number, default 30) to notice and report it themselves,
# then are stopped the same way. The launcher returns once every process
# and its output are done; the exit status is the first failure's, or 0.
# (A launcher stops only its own machine's processes: those of other
# machines learn of a failure from torchlora itself.)
set -uo pipefail

name=launch.sh
usage="usage: $name [--nnodes M --node-rank K --master-addr ADDR [--master-port PORT]] N PROGRAM [ARGS...]"
nnodes=1
node_rank=0
master_addr=""
master_port=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes | --node-rank | --master-addr | --master-port)
      if [ $# -lt 2 ]; then
        echo "$name: $1 needs a value; $usage" >&2
        exit 2
      fi
      case "$1" in
        --nnodes) nnodes=$2 ;;
        --node-rank) node_rank=$2 ;;
        --master-addr) master_addr=$2 ;;
        --master-port) master_port=$2 ;;
      esac
      shift 2
      ;;
    --*)
      echo "$name: unknown option '$1'; $usage" >&2
      exit 2
      ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]{0,3}$ ]]; then
  echo "$name: $usage (N a number of processes from 1 to 9999, got '${1:-}')" >&2
  exit 2
fi
count=$1
shift
if ! [[ "$nnodes" =~ ^[1-9][0-9]{0,4}$ ]]; then
  echo "$name: --nnodes must be a number of machines from 1 to 99999, got '$nnodes'" >&2
  exit 2
fi
if ! [[ "$node_rank" =~ ^(0|[1-9][0-9]{0,4})$ ]] || [ "$node_rank" -ge "$nnodes" ]; then
  echo "$name: --node-rank must be a number from 0 to $((nnodes - 1)), got '$node_rank'" >&2
  exit 2
fi
if [ "$nnodes" -gt 1 ] && [ -z "$master_addr" ]; then
  echo "$name: --nnodes $nnodes needs --master-addr: node 0's address, the same on every machine" >&2
  exit 2
fi
grace=${TORCHLORA_LAUNCH_GRACE:-30}
if ! [[ "$grace" =~ ^(0|[1-9][0-9]{0,5})$ ]]; then
  echo "$name: TORCHLORA_LAUNCH_GRACE must be a whole number of seconds, got '$grace'" >&2
  exit 2
fi
port=${master_port:-${MASTER_PORT:-}}
if [ -n "$port" ] && { ! [[ "$port" =~ ^[1-9][0-9]{0,4}$ ]] || [ "$port" -gt 65535 ]; }; then
  echo "$name: the master port must be a port number from 1 to 65535, got '$port'" >&2
  exit 2
fi
if [ -z "$master_addr" ]; then
  master_addr=127.0.0.1
fi

port_is_free() {
  # Nothing answers there (a connection is refused) on the loopback.
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
if [ -z "$port" ] && [ "$nnodes" -gt 1 ]; then
  port=29500
fi
if [ -z "$port" ]; then
  for _ in $(seq 1 50); do
    candidate=$((20000 + RANDOM % 40000))
    if port_is_free "$candidate"; then
      port=$candidate
      break
    fi
  done
  if [ -z "$port" ]; then
    echo "$name: found no free port on 127.0.0.1 in 50 tries" >&2
    exit 1
  fi
fi
if [ "$count" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then
  export OMP_NUM_THREADS=1
fi

pids=()
# Signals each process group, then KILLs what is left after 10 s.
stop_all() {
  local pid waited
  for pid in "${pids[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null
  done
  for waited in $(seq 1 100); do
    local alive=0
    for pid in "${pids[@]}"; do
      if kill -0 -- "-$pid" 2>/dev/null; then
        alive=1
      fi
    done
    [ "$alive" -eq 0 ] && return
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null
  done
}
trap 'stop_all; wait 2>/dev/null; exit 130' INT
trap 'stop_all; wait 2>/dev/null; exit 143' TERM

# Job control: every process (with its output's prefixer) in a group of its
# own, so that a signal reaches what it started too, and a terminal's
# Ctrl-C reaches the launcher only.
set -m
for ((local_rank = 0; local_rank < count; local_rank++)); do
  rank=$((node_rank * count + local_rank))
  (
    RANK=$rank LOCAL_RANK=$local_rank WORLD_SIZE=$((nnodes * count)) \
      LOCAL_WORLD_SIZE=$count MASTER_ADDR=$master_addr MASTER_PORT=$port \
      "$@" 2>&1 | sed -u "s/^/[rank $rank] /"
    exit "${PIPESTATUS[0]}"
  ) &
  pids+=($!)
done
set +m

status=0
remaining=$count
declare -A done_pids=()
deadline=""
while [ "$remaining" -gt 0 ]; do
  for index in "${!pids[@]}"; do
    pid=${pids[$index]}
    if [ -n "${done_pids[$pid]:-}" ] || kill -0 "$pid" 2>/dev/null; then
      continue
    fi
    wait "$pid" 2>/dev/null
    code=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then
      status=$code
      echo "$name: rank $((node_rank * count + index)) exited with status $code" >&2
      deadline=$((SECONDS + grace))
    fi
  done
  if [ -n "$deadline" ] && [ "$remaining" -gt 0 ] && [ "$SECONDS" -ge "$deadline" ]; then
    echo "$name: stopping the $remaining process(es) still running ${grace} s after the failure" >&2
    stop_all
    deadline=""
  fi
  [ "$remaining" -gt 0 ] && sleep 0.1
done
wait 2>/dev/null
exit "$status"
