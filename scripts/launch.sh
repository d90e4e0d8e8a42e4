#!/usr/bin/env bash
# Starts N local processes of a program the torchrun way, without Python:
# each gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR
# (127.0.0.1: nothing leaves the machine) and a free MASTER_PORT (or the
# MASTER_PORT already set). Each process's output and errors go to standard
# output, every line prefixed with "[rank K]". As torchrun does,
# OMP_NUM_THREADS is 1 unless set (several processes each with a full thread
# pool would fight over the cores; OpenBLAS reads it too).
#
# Each process runs in a process group of its own: Ctrl-C (INT) or TERM to
# the launcher stops every process and what they started (TERM, then KILL
# 10 s later). When one process fails, the others get TORCHLORA_LAUNCH_GRACE
# seconds (a whole number, default 30) to notice and report it themselves,
# then are stopped the same way. The launcher returns once every process
# and its output are done; the exit status is the first failure's, or 0.
#
#   scripts/launch.sh 2 build/default/examples/finetune_words --distributed
set -uo pipefail

name=launch.sh
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "$name: usage: $name N PROGRAM [ARGS...] (N a positive number of processes, got '${1:-}')" >&2
  exit 2
fi
count=$1
shift
grace=${TORCHLORA_LAUNCH_GRACE:-30}
if ! [[ "$grace" =~ ^[0-9]+$ ]]; then
  echo "$name: TORCHLORA_LAUNCH_GRACE must be a whole number of seconds, got '$grace'" >&2
  exit 2
fi
if [ -n "${MASTER_PORT:-}" ] && ! [[ "$MASTER_PORT" =~ ^[1-9][0-9]*$ ]]; then
  echo "$name: MASTER_PORT must be a port number, got '$MASTER_PORT'" >&2
  exit 2
fi

port_is_free() {
  # Nothing answers there (a connection is refused) on the loopback.
  ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}
port=${MASTER_PORT:-}
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
for ((rank = 0; rank < count; rank++)); do
  (
    RANK=$rank LOCAL_RANK=$rank WORLD_SIZE=$count LOCAL_WORLD_SIZE=$count \
      MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "$@" 2>&1 |
      sed -u "s/^/[rank $rank] /"
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
      echo "$name: rank $index exited with status $code" >&2
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
