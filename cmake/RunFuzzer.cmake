# Run with cmake -P: builds the fuzz project with clang and runs the
# safetensors fuzz target for SECONDS seconds on a copy of the seed corpus.
# Variables: SOURCE_DIR (torchlora), WORK_DIR, CLANGXX, SECONDS, PREFIX_PATH,
# MIN_RUNS (the fewest inputs the run must execute; 10000).
cmake_minimum_required(VERSION 3.18)
include("${CMAKE_CURRENT_LIST_DIR}/RunStep.cmake")

torchlora_run_step("fuzz test" "configure" "${CMAKE_COMMAND}" -S "${SOURCE_DIR}/fuzz" -B "${WORK_DIR}/build"
         -DCMAKE_CXX_COMPILER=${CLANGXX} -DCMAKE_BUILD_TYPE=RelWithDebInfo
         "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
torchlora_run_step("fuzz test" "build" "${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}/corpus")
file(COPY "${SOURCE_DIR}/fuzz/corpus/" DESTINATION "${WORK_DIR}/corpus")
torchlora_run_step("fuzz test" "run" "${WORK_DIR}/build/safetensors_fuzz"
         -max_total_time=${SECONDS} -print_final_stats=1
         "-dict=${SOURCE_DIR}/fuzz/safetensors.dict"
         "-artifact_prefix=${WORK_DIR}/"
         "${WORK_DIR}/corpus")
string(REGEX MATCH "Done [0-9]+ runs in [0-9]+ second\\(s\\)" done "${step_output}")
string(REGEX MATCH "stat::number_of_executed_units: *[0-9]+" units "${step_output}")
string(REGEX MATCH "cov: [0-9]+" coverage "${step_output}")
# A run that executed (almost) nothing found nothing either: fail it.
if(NOT DEFINED MIN_RUNS)
  set(MIN_RUNS 10000)
endif()
string(REGEX MATCH "[0-9]+$" executed "${units}")
if(executed STREQUAL "" OR executed LESS MIN_RUNS)
  message(FATAL_ERROR "fuzz test: the target ran only '${executed}' inputs "
          "(at least ${MIN_RUNS} expected in ${SECONDS} s):\n${step_output}")
endif()
message(STATUS "fuzz test: no finding. ${done}; ${units}; ${coverage}")
