# Warning flags for torchlora's own targets (tests, examples, benchmarks).
# LibTorch's headers come in as system headers, so these judge our code only.
function(torchlora_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra)
    if(TORCHLORA_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
  endif()
endfunction()
