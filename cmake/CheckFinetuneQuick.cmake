# Run with cmake -P: runs `finetune_words --quick` into OUT, then checks that
# every output file exists, that LoRA's held-out loss went down, and that
# the bits/char split by kind of character adds up to the table's.
# Variables: PROGRAM, OUT.
cmake_minimum_required(VERSION 3.18)
include("${CMAKE_CURRENT_LIST_DIR}/RunQuickExample.cmake")
set(out "${quick_output}")
require_quick_outputs(metrics.csv loss.svg samples.txt base_model.pt merged_model.pt
                      full_model.pt adapter/adapter_model.safetensors
                      adapter/adapter_config.json)
file(STRINGS "${OUT}/metrics.csv" rows REGEX "^LoRA,")
list(GET rows 0 first)
list(GET rows -1 last)
string(REPLACE "," ";" first "${first}")
string(REPLACE "," ";" last "${last}")
list(GET first 3 before)
list(GET last 3 after)
if(NOT after LESS before)
  message(FATAL_ERROR "LoRA's held-out loss did not go down: ${before} -> ${after} bits/char")
endif()
message(STATUS "LoRA's held-out loss went down: ${before} -> ${after} bits/char")

# "bits/char by what is predicted": three rows whose LoRA column adds up to
# LoRA's bits/char in the table (to rounding). Values in thousandths.
function(thousandths value result)
  string(REPLACE "." "" digits "${value}")
  string(REGEX REPLACE "^0+([0-9])" "\\1" digits "${digits}")
  set(${result} "${digits}" PARENT_SCOPE)
endfunction()
if(NOT out MATCHES "\n(\\[rank 0\\] )?LoRA +([0-9]+\\.[0-9][0-9][0-9]) ")
  message(FATAL_ERROR "no LoRA row in the table")
endif()
thousandths("${CMAKE_MATCH_2}" total)
set(sum 0)
set(rows 0)
foreach(kind "end of word" "accented letter" "other character")
  if(NOT out MATCHES "  ${kind} +[0-9.]+% +[0-9.]+ +([0-9]+\\.[0-9][0-9][0-9]) ")
    message(FATAL_ERROR "no \"${kind}\" row in the bits/char split")
  endif()
  thousandths("${CMAKE_MATCH_1}" part)
  math(EXPR sum "${sum} + ${part}")
endforeach()
math(EXPR difference "${sum} - ${total}")
if(difference GREATER 2 OR difference LESS -2)
  message(FATAL_ERROR "the bits/char split adds up to ${sum}, the table says ${total} (thousandths)")
endif()
message(STATUS "the bits/char split adds up to the table's: ${sum} vs ${total} thousandths")
