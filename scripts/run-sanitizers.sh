#!/usr/bin/env bash
# Installs what is missing, then builds the tests and examples with
# AddressSanitizer and UndefinedBehaviorSanitizer and runs them (the workflow
# preset "asan"). LibTorch itself is not instrumented: container-overflow
# checks are off (std::vector annotations would differ between our code and
# LibTorch's), and tests/sanitizers/*.supp hold the suppressions, each for a
# finding inside LibTorch, with its reason. Warnings are not errors here:
# instrumented, GCC 12 reports -Wmaybe-uninitialized inside libstdc++'s
# <regex>; the default preset keeps judging our code with -Werror.
# allocator_may_return_null=1: a test asks for more memory than there is
# (an 8 TiB file) and expects `new (std::nothrow)` to return null, as it
# does outside ASan; ASan would stop the run instead.
#
#   scripts/run-sanitizers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
cmake --workflow --preset asan
