# Run with cmake -P: runs `finetune_words --quick` into OUT, then checks that
# every output file exists and that LoRA's held-out loss went down.
# Variables: PROGRAM, OUT.
cmake_minimum_required(VERSION 3.18)
file(REMOVE_RECURSE "${OUT}")
execute_process(COMMAND "${PROGRAM}" --quick --out "${OUT}"
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message(STATUS "${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "finetune_words --quick failed (${rc})")
endif()
foreach(file metrics.csv loss.svg samples.txt base_model.pt merged_model.pt full_model.pt
             adapter/adapter_model.safetensors adapter/adapter_config.json)
  if(NOT EXISTS "${OUT}/${file}")
    message(FATAL_ERROR "finetune_words --quick wrote no ${file}")
  endif()
endforeach()
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
