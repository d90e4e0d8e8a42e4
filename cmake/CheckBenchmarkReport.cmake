# Run with cmake -P: a short run of linear_benchmark --report, then checks
# that the report files exist and hold a row of every variant. Never judges
# a timing. Variables: PROGRAM, PREFIX.
cmake_minimum_required(VERSION 3.18)
get_filename_component(folder "${PREFIX}" DIRECTORY)
file(REMOVE_RECURSE "${folder}")
file(MAKE_DIRECTORY "${folder}")
execute_process(
  COMMAND "${PROGRAM}" --report "${PREFIX}" --benchmark_min_time=0.01
          --paired_rounds 3 --paired_max_rounds 3 --paired_block_s 0.005
          "--benchmark_filter=^cpu/f32/16x"
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
message(STATUS "${out}")
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "linear_benchmark --report failed (${rc})")
endif()
foreach(file "${PREFIX}.json" "${PREFIX}-memory.json" "${PREFIX}.svg")
  if(NOT EXISTS "${file}")
    message(FATAL_ERROR "the report wrote no ${file}")
  endif()
endforeach()
file(READ "${PREFIX}.json" json)
# The run's settings come first: the BLAS build and the thread counts.
foreach(field context blas openblas_build openblas_threads torch_threads
              OMP_NUM_THREADS OPENBLAS_NUM_THREADS rows)
  if(NOT json MATCHES "\"${field}\":")
    message(FATAL_ERROR "the report has no ${field}")
  endif()
endforeach()
if(NOT out MATCHES "run: [^\n]*LibTorch thread")
  message(FATAL_ERROR "the report printed no line with its BLAS and threads")
endif()
foreach(variant plain plain_again full_ft unfused torchlora merged mixed mixed_naive)
  if(NOT json MATCHES "\"variant\": \"${variant}\"")
    message(FATAL_ERROR "the report has no row for ${variant}")
  endif()
endforeach()
foreach(field device dtype n d_in d_out rank fwd_ms fwdbwd_ms fwd_ratio fwdbwd_ratio
              fwd_pair_spread fwdbwd_pair_spread fwd_pair_rounds fwdbwd_pair_rounds
              adapters base_rows fwd_ratio_to_single)
  if(NOT json MATCHES "\"${field}\":")
    message(FATAL_ERROR "the report rows have no field ${field}")
  endif()
endforeach()
