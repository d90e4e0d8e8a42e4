# Run with cmake -P: the data-parallel guide's block (docs/data-parallel.md) (compiled into
# PROGRAM, the distributed test binary, as the test DataParallel.*) run once as a
# single process and once as 2 processes under LAUNCHER; each must exit 0
# (its loss went down), and the adapter rank 0 saved must equal the single
# process's to float32 rounding: averaging the ranks' gradients is training
# on the whole batch.
# Variables: PROGRAM, LAUNCHER (scripts/launch.sh), WORK_DIR.
cmake_minimum_required(VERSION 3.18)
function(run_in folder what)
  file(MAKE_DIRECTORY "${WORK_DIR}/${folder}")
  execute_process(COMMAND ${ARGN} WORKING_DIRECTORY "${WORK_DIR}/${folder}"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message(STATUS "${what}:\n${out}")
  set(out "${out}" PARENT_SCOPE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc})")
  endif()
endfunction()
file(REMOVE_RECURSE "${WORK_DIR}")
unset(ENV{WORLD_SIZE})
run_in(single "the guide's block, one process" "${PROGRAM}" --gtest_filter=DataParallel.*)
run_in(two "the guide's block, 2 processes" bash "${LAUNCHER}" 2 "${PROGRAM}" --gtest_filter=DataParallel.*)
# Both ranks ran the block and passed.
foreach(rank 0 1)
  if(NOT out MATCHES "\\[rank ${rank}\\] \\[  PASSED  \\] 1 test")
    message(FATAL_ERROR "rank ${rank} did not pass the guide's block")
  endif()
endforeach()
run_in(. "the adapters compared" "${PROGRAM}" worker compare-adapters
       "${WORK_DIR}/single/out/adapter" "${WORK_DIR}/two/out/adapter" 1e-5)
