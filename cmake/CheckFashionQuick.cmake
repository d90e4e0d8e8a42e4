# Run with cmake -P: runs `finetune_fashion --quick` into OUT (the program
# exits non-zero when what it claims does not hold), then checks that every
# output file exists and that metrics.csv holds the curves of every run.
# Variables: PROGRAM, OUT.
cmake_minimum_required(VERSION 3.18)
include("${CMAKE_CURRENT_LIST_DIR}/RunQuickExample.cmake")
require_quick_outputs(metrics.csv accuracy.svg base_model.pt full_model.pt
                      adapter/adapter_model.safetensors adapter/adapter_config.json)
foreach(run base "head only" LoRA full)
  file(STRINGS "${OUT}/metrics.csv" rows REGEX "^${run},")
  list(LENGTH rows count)
  if(count LESS 2)
    message(FATAL_ERROR "metrics.csv has ${count} rows of \"${run}\"")
  endif()
endforeach()
