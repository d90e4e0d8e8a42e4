# Run with cmake -P: the TorchScript fixtures made anew by this machine's
# PyTorch (scripts/make-jit-fixtures.py), the fixture tests run on them, and
# the modules C++ adapted and merged run back in Python
# (tests/jit/check_merged.py), where their outputs must equal Python's own.
# Variables: PYTHON, SOURCE_DIR, PROGRAM (torchlora_tests), WORK_DIR.
cmake_minimum_required(VERSION 3.18)
file(REMOVE_RECURSE "${WORK_DIR}")
include("${CMAKE_CURRENT_LIST_DIR}/RunSteps.cmake")
run_step("make-jit-fixtures.py" "${PYTHON}"
         "${SOURCE_DIR}/scripts/make-jit-fixtures.py" "${WORK_DIR}/fixtures")
run_step("the fixture tests" "${CMAKE_COMMAND}" -E env
         "TORCHLORA_JIT_FIXTURES=${WORK_DIR}/fixtures"
         "TORCHLORA_JIT_MERGED=${WORK_DIR}/merged"
         "${PROGRAM}" "--gtest_filter=JitFixtures.*")
run_step("check_merged.py" "${PYTHON}" "${SOURCE_DIR}/tests/jit/check_merged.py"
         "${WORK_DIR}/fixtures" "${WORK_DIR}/merged")
