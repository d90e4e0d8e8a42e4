# For scripts run with cmake -P: torchlora_run_step(TEST WHAT COMMAND...)
# runs COMMAND; on failure it stops the script with "TEST: WHAT failed" and
# the command's output, else it sets step_output to that output.
function(torchlora_run_step test what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${test}: ${what} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()
