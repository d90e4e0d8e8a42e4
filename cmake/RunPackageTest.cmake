# Run with cmake -P: proves that a consumer project can use torchlora.
#   MODE=find_package      install the build tree to a prefix, find_package it
#   MODE=add_subdirectory  add the source tree with add_subdirectory
# Other variables: TORCHLORA_SOURCE_DIR, TORCHLORA_BINARY_DIR,
# CONSUMER_SOURCE_DIR, WORK_DIR, PACKAGE_CONFIG_DIR (where the install rules
# put the package config, relative to the prefix), Torch_DIR, CXX_COMPILER, GENERATOR, and
# CUDA_COMPILER (empty without CUDA: a CUDA LibTorch's CMake config needs
# nvcc at configure time, so the consumer gets the one the build found).

cmake_minimum_required(VERSION 3.18)
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc
                  OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "package test (${MODE}): ${what} failed (${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(configure_args
  -S "${CONSUMER_SOURCE_DIR}" -B "${WORK_DIR}/build" -G "${GENERATOR}"
  -DCMAKE_BUILD_TYPE=Release
  # The consumer shows that the package is found and works; at -O1 it
  # builds in about half the time of -O3.
  "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG"
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  -DTorch_DIR=${Torch_DIR})
if(CUDA_COMPILER)
  list(APPEND configure_args "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}")
endif()

if(MODE STREQUAL "find_package")
  run_step("install" "${CMAKE_COMMAND}" --install "${TORCHLORA_BINARY_DIR}"
           --prefix "${WORK_DIR}/prefix")
  foreach(file include/torchlora/torchlora.h
               ${PACKAGE_CONFIG_DIR}/torchloraConfig.cmake
               ${PACKAGE_CONFIG_DIR}/torchloraConfigVersion.cmake
               ${PACKAGE_CONFIG_DIR}/torchloraTargets.cmake)
    if(NOT EXISTS "${WORK_DIR}/prefix/${file}")
      file(GLOB_RECURSE installed RELATIVE "${WORK_DIR}/prefix" "${WORK_DIR}/prefix/*")
      message(FATAL_ERROR "package test: ${file} was not installed; got: ${installed}")
    endif()
  endforeach()
  list(APPEND configure_args "-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix")
elseif(MODE STREQUAL "add_subdirectory")
  list(APPEND configure_args "-DTORCHLORA_SOURCE_DIR=${TORCHLORA_SOURCE_DIR}")
else()
  message(FATAL_ERROR "package test: unknown MODE '${MODE}'")
endif()

run_step("configure" "${CMAKE_COMMAND}" ${configure_args})
run_step("build" "${CMAKE_COMMAND}" --build "${WORK_DIR}/build")
run_step("run" "${WORK_DIR}/build/consumer")
if(NOT step_output MATCHES "consumer: ok")
  message(FATAL_ERROR "package test: unexpected consumer output:\n${step_output}")
endif()
message(STATUS "package test (${MODE}): ${step_output}")
