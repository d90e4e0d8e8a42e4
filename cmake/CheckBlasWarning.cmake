# Run with cmake -P: BlasThreads.ReadsThisProcess alone, with one of Debian's
# OpenBLAS builds first on the library path and two LibTorch threads, then
# counts torchlora's BLAS threading warnings in its output. Variables:
# PROGRAM (torchlora_tests), VARIANT (openblas-openmp, openblas-pthread or
# openblas-pthread-one-thread: the pthread build with
# OPENBLAS_NUM_THREADS=1), LIBRARY_ARCHITECTURE (e.g. x86_64-linux-gnu).
cmake_minimum_required(VERSION 3.18)
set(build "${VARIANT}")
set(openblas_threads "")
set(expected 0)
if(VARIANT STREQUAL "openblas-pthread")
  set(expected 1)
elseif(VARIANT STREQUAL "openblas-pthread-one-thread")
  set(build openblas-pthread)
  set(openblas_threads 1)
endif()
set(dir "/usr/lib/${LIBRARY_ARCHITECTURE}/${build}")
if(LIBRARY_ARCHITECTURE STREQUAL "" OR NOT EXISTS "${dir}/libblas.so.3")
  string(REPLACE "openblas-" "libopenblas0-" package "${build}")
  message("SKIPPED: ${dir}/libblas.so.3 is not here (Debian package "
          "${package}), so this OpenBLAS build cannot be tried")
  return()
endif()
if(openblas_threads STREQUAL "")
  set(openblas_setting --unset=OPENBLAS_NUM_THREADS)
else()
  set(openblas_setting OPENBLAS_NUM_THREADS=${openblas_threads})
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" -E env
          "LD_LIBRARY_PATH=${dir}" OMP_NUM_THREADS=2 ${openblas_setting}
          --unset=GOTO_NUM_THREADS "TORCHLORA_EXPECT_BLAS=${build}"
          "${PROGRAM}" --gtest_filter=BlasThreads.ReadsThisProcess
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message("${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "BlasThreads.ReadsThisProcess failed (${rc}) with ${dir}")
endif()
if(NOT out MATCHES "\\[  PASSED  \\] 1 test")
  message(FATAL_ERROR "BlasThreads.ReadsThisProcess did not run")
endif()
string(REGEX MATCHALL "torchlora: this process calls the pthread build of OpenBLAS"
       warnings "${out}")
list(LENGTH warnings count)
if(NOT count EQUAL expected)
  message(FATAL_ERROR
    "${count} BLAS threading warnings with ${VARIANT}; expected ${expected}")
endif()
message(STATUS "${VARIANT}: ${count} warning(s), as expected")
