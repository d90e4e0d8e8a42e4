# Run with cmake -P: runs `finetune_words --quick` into OUT, then checks that
# every output file exists, that both LoRA placements' held-out loss went
# down, and that the bits/char split by kind of character adds up to the
# table's, for every model.
# Variables: PROGRAM, OUT (and LAUNCHER, EXTRA_ARGS: see RunQuickExample).
cmake_minimum_required(VERSION 3.18)
include("${CMAKE_CURRENT_LIST_DIR}/RunQuickExample.cmake")
set(out "${quick_output}")
require_quick_outputs(metrics.csv loss.svg samples.txt base_model.pt merged_model.pt
                      full_model.pt
                      adapter_q_v/adapter_model.safetensors adapter_q_v/adapter_config.json
                      adapter_all_linear/adapter_model.safetensors
                      adapter_all_linear/adapter_config.json)
foreach(run lora_q_v lora_all_linear)
  file(STRINGS "${OUT}/metrics.csv" rows REGEX "^${run},")
  if(NOT rows)
    message(FATAL_ERROR "metrics.csv has no ${run} rows")
  endif()
  list(GET rows 0 first)
  list(GET rows -1 last)
  string(REPLACE "," ";" first "${first}")
  string(REPLACE "," ";" last "${last}")
  list(GET first 3 before)
  list(GET last 3 after)
  if(NOT after LESS before)
    message(FATAL_ERROR "${run}'s held-out loss did not go down: ${before} -> ${after} bits/char")
  endif()
  message(STATUS "${run}'s held-out loss went down: ${before} -> ${after} bits/char")
endforeach()

# "bits/char by what is predicted": three rows, one column per model, whose
# columns add up to the models' bits/char in the table (to rounding).
# Values in thousandths.
function(thousandths value result)
  string(REPLACE "." "" digits "${value}")
  string(REGEX REPLACE "^0+([0-9])" "\\1" digits "${digits}")
  set(${result} "${digits}" PARENT_SCOPE)
endfunction()
set(number "([0-9]+\\.[0-9][0-9][0-9])")
set(models base "LoRA q,v" "LoRA all-linear" "full fine-tune")
set(index 0)
foreach(model IN LISTS models)
  if(NOT out MATCHES "\n(\\[rank 0\\] )?${model} +${number} ")
    message(FATAL_ERROR "no \"${model}\" row in the table")
  endif()
  thousandths("${CMAKE_MATCH_2}" total)
  set(sum 0)
  foreach(kind "end of word" "accented letter" "other character")
    if(NOT out MATCHES "  ${kind} +[0-9.]+% +${number} +${number} +${number} +${number}\n")
      message(FATAL_ERROR "no \"${kind}\" row with four models in the bits/char split")
    endif()
    math(EXPR group "${index} + 1")
    thousandths("${CMAKE_MATCH_${group}}" part)
    math(EXPR sum "${sum} + ${part}")
  endforeach()
  math(EXPR difference "${sum} - ${total}")
  if(difference GREATER 2 OR difference LESS -2)
    message(FATAL_ERROR "${model}: the bits/char split adds up to ${sum}, the table says ${total} (thousandths)")
  endif()
  message(STATUS "${model}: the bits/char split adds up to the table's: ${sum} vs ${total} thousandths")
  math(EXPR index "${index} + 1")
endforeach()
