# Warning flags for torchlora's own targets (tests, examples, benchmarks).
# LibTorch's headers come in as system headers, so these judge our code only.
#
# One exception, GCC 14 and later: -Warray-bounds and -Wstringop-overflow
# fire inside libstdc++'s std::vector<bool>::reserve as inlined into
# LibTorch's torch::autograd::Function<T>::apply (custom_function.h), which
# any custom autograd Function instantiates. The code is LibTorch's and
# correct (a known GCC false positive on vector<bool>); the warning's
# location is in a system header, so no pragma of ours can reach it. These
# two warnings are therefore off with GCC >= 14 only; GCC 12 (Debian 12)
# keeps them on, as errors, for our code.
function(torchlora_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
    if(TORCHLORA_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
  if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU"
     AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 14)
    target_compile_options(${target} PRIVATE
      -Wno-array-bounds -Wno-stringop-overflow)
  endif()
endfunction()
