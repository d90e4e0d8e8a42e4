# Included by the Check*Quick.cmake scripts (run with cmake -P): runs
# `PROGRAM --quick --out OUT` in an empty OUT, prints what it wrote, fails
# if it failed, and leaves its output in `quick_output`.
# Variables: PROGRAM, OUT; optional LAUNCHER (a command and its arguments
# that start PROGRAM, e.g. scripts/launch.sh;2) and EXTRA_ARGS.
file(REMOVE_RECURSE "${OUT}")
get_filename_component(quick_program "${PROGRAM}" NAME)
execute_process(COMMAND ${LAUNCHER} "${PROGRAM}" --quick --out "${OUT}" ${EXTRA_ARGS}
                RESULT_VARIABLE quick_rc OUTPUT_VARIABLE quick_output
                ERROR_VARIABLE quick_output)
message(STATUS "${quick_output}")
if(NOT quick_rc EQUAL 0)
  message(FATAL_ERROR "${quick_program} --quick failed (${quick_rc})")
endif()
# Kept for checks that compare two runs.
file(WRITE "${OUT}/quick-output.txt" "${quick_output}")

# Fails unless every file named after the program's name exists under OUT
# and is not empty.
function(require_quick_outputs)
  foreach(file ${ARGN})
    if(NOT EXISTS "${OUT}/${file}")
      message(FATAL_ERROR "${quick_program} --quick wrote no ${file}")
    endif()
    file(SIZE "${OUT}/${file}" size)
    if(size EQUAL 0)
      message(FATAL_ERROR "${quick_program} --quick wrote an empty ${file}")
    endif()
  endforeach()
endfunction()
