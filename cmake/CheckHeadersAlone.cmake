# Run with cmake -P: configures and builds tests/headers_alone (every public
# header compiled on its own) in WORK_DIR with CXX, on JOBS cores.
# Variables: SOURCE_DIR (torchlora), WORK_DIR, CXX, JOBS, PREFIX_PATH.
cmake_minimum_required(VERSION 3.18)
include("${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake")
torchlora_run_step("headers.compile_alone" "configure" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/headers_alone"
         -B "${WORK_DIR}" -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release
         "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
torchlora_run_step("headers.compile_alone" "build"
  "${CMAKE_COMMAND}" --build "${WORK_DIR}" --parallel ${JOBS})
message(STATUS "${step_output}")
