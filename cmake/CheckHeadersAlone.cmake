# Run with cmake -P: configures and builds tests/headers_alone (every public
# header compiled on its own) in WORK_DIR with CXX, on JOBS cores.
# Variables: SOURCE_DIR (torchlora), WORK_DIR, CXX, JOBS, PREFIX_PATH.
cmake_minimum_required(VERSION 3.18)
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "headers.compile_alone: ${what} failed (${rc}):\n${out}")
  endif()
  message(STATUS "${out}")
endfunction()
run_step("configure" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/tests/headers_alone"
         -B "${WORK_DIR}" -DCMAKE_CXX_COMPILER=${CXX} -DCMAKE_BUILD_TYPE=Release
         "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
run_step("build" "${CMAKE_COMMAND}" --build "${WORK_DIR}" --parallel ${JOBS})
