#!/usr/bin/env bash
# Where the CPU time of a benchmark goes: runs each named benchmark of
# linear_benchmark alone under `perf record` (Debian's linux-perf) and prints
# the milliseconds of a call spent in each kind of work (GEMM kernels,
# GEMM packing, OpenMP waiting, memory copies and fills, allocation, the
# kernel, LibTorch's dispatch and autograd, ...), next to the wall time per
# call. With two names, also the difference: where the second's extra time
# goes. Then the symbols whose time differs most (PROFILE_TOP, 12).
#
#   scripts/profile-cpu.sh NAME [NAME2] [seconds]
#
# NAME is a benchmark name as `linear_benchmark --benchmark_list_tests`
# prints it, without the "/min_warmup_time" suffix, e.g.
#   scripts/profile-cpu.sh cpu/f32/2048x1024x1024/r16/plain/fwdbwd \
#                          cpu/f32/2048x1024x1024/r16/torchlora/fwdbwd
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v perf >/dev/null 2>&1; then
  echo "profile-cpu: perf is missing (Debian package linux-perf)" >&2
  exit 1
fi
names=()
seconds=5
for argument in "$@"; do
  if [[ "$argument" =~ ^[0-9.]+$ ]]; then
    seconds="$argument"
  else
    names+=("$argument")
  fi
done
if [ "${#names[@]}" -lt 1 ] || [ "${#names[@]}" -gt 2 ]; then
  echo "usage: scripts/profile-cpu.sh NAME [NAME2] [seconds]" >&2
  exit 2
fi
cmake --preset default >/dev/null
cmake --build --preset default --target linear_benchmark >/dev/null
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
frequency=4000
delay_ms=3000
index=0
for name in "${names[@]}"; do
  index=$((index + 1))
  # perf samples every thread of the process (OpenBLAS's too) on the CPU
  # clock, so each sample is 1/frequency s of one CPU. Sampling starts after
  # the process's start-up (loading LibTorch, making every benchmark's
  # layers), which is not part of a call.
  start="$(date +%s.%N)"
  perf record -q -D "$delay_ms" -F "$frequency" -e cpu-clock \
    -o "$work/$index.data" -- \
    build/default/benchmarks/linear_benchmark \
    --benchmark_filter="^${name}/min_warmup_time" \
    --benchmark_min_time="$seconds" \
    --benchmark_out="$work/$index.json" --benchmark_out_format=json \
    >/dev/null 2>&1
  echo "$start $(date +%s.%N) $delay_ms" >"$work/$index.elapsed"
  perf report -i "$work/$index.data" --stdio --no-children --sort dso,sym \
    -F sample,dso,sym -t $'\t' -q 2>/dev/null >"$work/$index.txt"
done
python3 - "$frequency" "$work" "${names[@]}" <<'EOF'
import json, os, re, sys

frequency = float(sys.argv[1])
work = sys.argv[2]
names = sys.argv[3:]

# Kinds of work, tried in order on "dso symbol".
KINDS = [
    ("GEMM kernel", r"gemm_kernel|gemm_small_kernel|gemv_[nt]\b|sgemv|dgemv"),
    ("GEMM packing", r"gemm_(i|o)[nt]copy|gemm_beta|_[nt]copy"),
    ("OpenMP and BLAS threads waiting", r"gomp_|GOMP_|libgomp|blas_thread|exec_blas|sched_yield|do_spin|futex"),
    ("memory copy and fill", r"memcpy|memmove|memset|clear_page|copy_page|copy_kernel|fill_kernel|vectorized_loop|basic_loop"),
    ("allocation", r"malloc|free|_int_|posix_memalign|alloc_cpu|free_cpu|brk|mmap|munmap|DefaultCPUAllocator"),
    ("page faults and other kernel work", r"\[kernel"),
    ("LibTorch: element-wise and reductions", r"at::native::.*(add|mul|sum|reduce|cpu_kernel)"),
    ("LibTorch: dispatch, autograd, tensor bookkeeping", r"libtorch|libc10|at::|c10::|torch::"),
]


def profile(index):
    with open(f"{work}/{index}.json") as f:
        run = [b for b in json.load(f)["benchmarks"]][-1]
    scale = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}[run.get("time_unit", "ns")]
    wall_ms = run["real_time"] * scale
    with open(f"{work}/{index}.elapsed") as f:
        start, end, delay_ms = map(float, f.read().split())
        start += delay_ms / 1000
    kinds = {}
    symbols = {}
    total = 0
    with open(f"{work}/{index}.txt") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or not parts[0].strip().isdigit():
                continue
            samples = int(parts[0])
            what = parts[1].strip() + " " + parts[2].strip()
            kind = "other"
            for label, pattern in KINDS:
                if re.search(pattern, what):
                    kind = label
                    break
            kinds[kind] = kinds.get(kind, 0) + samples
            symbol = parts[2].strip()
            symbols[symbol] = symbols.get(symbol, 0) + samples
            total += samples
    # The wall time of a call shared out over the kinds of work by their
    # samples; `busy` is how many CPUs the process kept busy on average
    # while sampled (about 1 where LibTorch runs one thread: OpenBLAS's
    # OpenMP build follows it).
    busy = total / frequency / (end - start)
    per_call = {k: wall_ms * v / total for k, v in kinds.items()}
    per_symbol = {k: wall_ms * v / total for k, v in symbols.items()}
    return wall_ms, per_call, busy, per_symbol


results = [profile(i + 1) for i in range(len(names))]
labels = [label for label, _ in KINDS] + ["other"]
header = "| kind of work | " + " | ".join(f"{n} ms/call" for n in names)
if len(names) == 2:
    header += " | difference"
print(header + " |")
print("|---" * (len(names) + (2 if len(names) == 2 else 1)) + "|")
for label in labels:
    values = [r[1].get(label, 0.0) for r in results]
    if all(v < 0.0005 for v in values):
        continue
    line = f"| {label} | " + " | ".join(f"{v:.3f}" for v in values)
    if len(names) == 2:
        line += f" | {values[1] - values[0]:+.3f}"
    print(line + " |")
print("| CPUs busy while sampled | " + " | ".join(f"{r[2]:.2f}" for r in results)
      + (" | |" if len(names) == 2 else " |"))
walls = [r[0] for r in results]
line = "| wall time per call | " + " | ".join(f"{v:.3f}" for v in walls)
if len(names) == 2:
    line += f" | {walls[1] - walls[0]:+.3f}"
print(line + " |")

# The symbols whose time differs most (or the largest, for one name).
top = int(os.environ.get("PROFILE_TOP", "12"))
every = set().union(*(r[3].keys() for r in results))


def moved(symbol):
    values = [r[3].get(symbol, 0.0) for r in results]
    return abs(values[-1] - values[0]) if len(values) == 2 else values[0]


print()
print("| symbol | " + " | ".join("ms/call" for _ in names)
      + (" | difference |" if len(names) == 2 else " |"))
print("|---" * (len(names) + (2 if len(names) == 2 else 1)) + "|")
for symbol in sorted(every, key=moved, reverse=True)[:top]:
    values = [r[3].get(symbol, 0.0) for r in results]
    line = f"| `{symbol[:70]}` | " + " | ".join(f"{v:.3f}" for v in values)
    if len(names) == 2:
        line += f" | {values[1] - values[0]:+.3f}"
    print(line + " |")
EOF
