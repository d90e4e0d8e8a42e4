# Included by the Check*.cmake scripts (run with cmake -P) that run a few
# programs in turn: run_step(WHAT COMMAND...) runs COMMAND, prints its
# output, fails naming WHAT if it fails, and leaves its output in
# step_output.
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                  ERROR_VARIABLE out)
  message(STATUS "${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${what} failed (${rc})")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()
