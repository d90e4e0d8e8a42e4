# Run with cmake -P: the TorchScript example from end to end, quickly.
# Python trains and scripts the model (train.py --quick), the C++ program
# fine-tunes it with LoRA and writes the adapter and the merged model
# (--quick; it exits non-zero when what it claims does not hold), and Python
# evaluates the merged model: its count of correct test images must equal
# the one the C++ program measured.
# Variables: PYTHON, SCRIPT (train.py), PROGRAM, OUT.
cmake_minimum_required(VERSION 3.18)
file(REMOVE_RECURSE "${OUT}")
include("${CMAKE_CURRENT_LIST_DIR}/RunSteps.cmake")
run_step("train.py --quick" "${PYTHON}" "${SCRIPT}" --out "${OUT}" --quick)
run_step("torchscript_finetune --quick" "${PROGRAM}" --model "${OUT}/base.pt"
         --out "${OUT}" --quick)
run_step("train.py --evaluate" "${PYTHON}" "${SCRIPT}" --evaluate "${OUT}/merged.pt")
foreach(file adapter/adapter_model.safetensors adapter/adapter_config.json
             merged.pt metrics.txt)
  if(NOT EXISTS "${OUT}/${file}")
    message(FATAL_ERROR "torchscript_finetune --quick wrote no ${file}")
  endif()
endforeach()
file(STRINGS "${OUT}/metrics.txt" merged REGEX "^merged=")
string(REPLACE "merged=" "" merged "${merged}")
if(NOT step_output MATCHES "\\(([0-9]+) of [0-9]+\\)")
  message(FATAL_ERROR "train.py --evaluate printed no count")
endif()
if(NOT CMAKE_MATCH_1 STREQUAL merged)
  message(FATAL_ERROR "Python counts ${CMAKE_MATCH_1} correct images with the "
                      "merged model, C++ counted ${merged}")
endif()
message(STATUS "the merged model: ${merged} correct in C++ and in Python")
