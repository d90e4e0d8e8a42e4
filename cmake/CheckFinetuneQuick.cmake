# Run with cmake -P: runs `finetune_words --quick` into OUT (the program
# exits non-zero unless each adapter file reloads to the same bits and the
# merged model scores what it did unmerged), then checks that every output
# file exists and is not empty, that both LoRA placements' held-out bits
# went down to below a threshold, that the printed merged score is the
# table's, and that the bits/char split by kind of character adds up to the
# table's, for every model. With SINGLE_OUT (the folder of a single-process
# run of the same program), every model's bits/char must equal that run's to
# the third decimal, within one in its last digit (a data-parallel run trains
# on the same batches).
# Variables: PROGRAM, OUT, MODEL (own, the default, or torch-encoder: then
# --model torch-encoder is passed and its placements are checked),
# SINGLE_OUT, and LAUNCHER, EXTRA_ARGS: see RunQuickExample.
#
# The thresholds: a real --quick run (Debian 12, OpenBLAS's OpenMP build)
# gave q,v 3.790, DoRA all-linear 3.581, PiSSA all-linear 3.523, NF4 base +
# LoRA all-linear 3.571 and LoRA all-linear 3.580 bits/char (own model), self_attn
# 3.635 and attn+ffn 3.516 (torch-encoder), from a base near 4.2; each
# threshold is that value plus 0.1, which a run that learned little misses.
cmake_minimum_required(VERSION 3.18)
if(MODEL STREQUAL "torch-encoder")
  list(APPEND EXTRA_ARGS --model torch-encoder)
  set(placements lora_attn lora_attn_ffn)
  set(thresholds 3.735 3.616)
  set(folders adapter_attn adapter_attn_ffn)
  set(models base "LoRA self_attn" "LoRA attn+ffn" "full fine-tune")
else()
  set(placements lora_q_v dora_all_linear pissa_all_linear nf4_all_linear
      lora_all_linear)
  set(thresholds 3.890 3.681 3.623 3.671 3.680)
  set(folders adapter_q_v adapter_dora_all_linear adapter_pissa_all_linear
      adapter_nf4_all_linear adapter_all_linear)
  set(models base "LoRA q,v" "DoRA all-linear" "PiSSA all-linear"
      "NF4 base + LoRA all-linear" "LoRA all-linear" "full fine-tune")
endif()
include("${CMAKE_CURRENT_LIST_DIR}/RunQuickExample.cmake")
set(out "${quick_output}")
require_quick_outputs(metrics.csv loss.svg samples.txt base_model.pt merged_model.pt
                      full_model.pt)
foreach(folder IN LISTS folders)
  require_quick_outputs(${folder}/adapter_model.safetensors ${folder}/adapter_config.json)
endforeach()
foreach(run IN LISTS placements)
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
  list(POP_FRONT thresholds threshold)
  if(NOT after LESS before)
    message(FATAL_ERROR "${run}'s held-out loss did not go down: ${before} -> ${after} bits/char")
  endif()
  if(after GREATER threshold)
    message(FATAL_ERROR "${run}'s held-out bits/char ended at ${after}, above ${threshold}")
  endif()
  message(STATUS "${run}'s held-out loss went down: ${before} -> ${after} bits/char (at most ${threshold})")
endforeach()

# "bits/char by what is predicted": three rows, one column per model, whose
# columns add up to the models' bits/char in the table (to rounding).
# Values in thousandths.
function(thousandths value result)
  string(REPLACE "." "" digits "${value}")
  # Without leading zeros (REGEX REPLACE would strip every match's).
  string(REGEX MATCH "[1-9][0-9]*$" digits "${digits}")
  if(digits STREQUAL "")
    set(digits 0)
  endif()
  set(${result} "${digits}" PARENT_SCOPE)
endfunction()
set(number "([0-9]+\\.[0-9][0-9][0-9])")
# One column per model in the split.
list(LENGTH models model_count)
set(columns "")
foreach(i RANGE 1 ${model_count})
  string(APPEND columns " +${number}")
endforeach()
set(index 0)
foreach(model IN LISTS models)
  string(REPLACE "+" "\\+" model_pattern "${model}")
  if(NOT out MATCHES "\n(\\[rank 0\\] )?${model_pattern} +${number} ")
    message(FATAL_ERROR "no \"${model}\" row in the table")
  endif()
  thousandths("${CMAKE_MATCH_2}" total)
  set(table_${index} "${CMAKE_MATCH_2}")
  set(sum 0)
  foreach(kind "end of word" "accented letter" "other character")
    if(NOT out MATCHES "  ${kind} +[0-9.]+%${columns}\n")
      message(FATAL_ERROR "no \"${kind}\" row with ${model_count} models in the bits/char split")
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

# The merged model's printed score is the table's row of that placement (the
# last LoRA one, before full fine-tuning).
math(EXPR merged_index "${model_count} - 2")
list(GET models ${merged_index} merged_model)
string(REPLACE "+" "\\+" merged_pattern "${merged_model}")
if(NOT out MATCHES "merged ${merged_pattern} model: ${number} bits/char")
  message(FATAL_ERROR "no \"merged ${merged_model} model\" line")
endif()
# Printed to the third decimal: equal up to one in the last digit (the
# program itself allows 5e-4 between the two).
function(expect_same_thousandths what first second)
  thousandths("${first}" a)
  thousandths("${second}" b)
  math(EXPR difference "${a} - ${b}")
  if(difference GREATER 1 OR difference LESS -1)
    message(FATAL_ERROR "${what}: ${first} against ${second} bits/char")
  endif()
endfunction()
expect_same_thousandths("the merged ${merged_model} model against the table"
                        "${CMAKE_MATCH_1}" "${table_${merged_index}}")
message(STATUS "merged ${merged_model}: ${CMAKE_MATCH_1} bits/char, as in the table")

# A data-parallel run equals the single-process one to the third decimal
# (within one in its last digit).
if(SINGLE_OUT)
  # Both ranks trained, each on its share of every batch.
  if(NOT out MATCHES "\\[rank 0\\] data-parallel over 2 processes"
     OR NOT out MATCHES "\\[rank 0\\] distributed: 2 processes, each on its share")
    message(FATAL_ERROR "the output does not show 2 processes training data-parallel")
  endif()
  file(READ "${SINGLE_OUT}/quick-output.txt" single)
  set(index 0)
  foreach(model IN LISTS models)
    string(REPLACE "+" "\\+" model_pattern "${model}")
    if(NOT single MATCHES "\n${model_pattern} +${number} ")
      message(FATAL_ERROR "no \"${model}\" row in ${SINGLE_OUT}/quick-output.txt")
    endif()
    expect_same_thousandths("${model}, 2 processes against one"
                            "${table_${index}}" "${CMAKE_MATCH_1}")
    message(STATUS "${model}: ${CMAKE_MATCH_1} bits/char, as in the single-process run")
    math(EXPR index "${index} + 1")
  endforeach()
endif()
