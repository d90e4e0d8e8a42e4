# Finding torchlora's dependencies, with messages that say how to get them.

# LibTorch: Debian's libtorch-dev, a pytorch.org archive or a pip wheel
# (pass its folder in CMAKE_PREFIX_PATH).
macro(torchlora_find_torch)
  if(NOT TARGET torch)
    find_package(Torch QUIET)
    if(NOT Torch_FOUND)
      message(FATAL_ERROR
        "torchlora: LibTorch was not found. On Debian run scripts/install-deps.sh "
        "(package libtorch-dev); otherwise pass the LibTorch folder, e.g. "
        "-DCMAKE_PREFIX_PATH=$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')")
    endif()
  endif()
endmacro()

# nlohmann-json, for safetensors headers and adapter configs: Debian's
# nlohmann-json3-dev, or any install found through CMAKE_PREFIX_PATH.
macro(torchlora_find_json)
  if(NOT TARGET nlohmann_json::nlohmann_json)
    find_package(nlohmann_json 3.9 QUIET)
    if(NOT nlohmann_json_FOUND)
      message(FATAL_ERROR
        "torchlora: nlohmann-json was not found. On Debian run "
        "scripts/install-deps.sh (package nlohmann-json3-dev); otherwise add "
        "its install prefix to CMAKE_PREFIX_PATH.")
    endif()
  endif()
endmacro()

# torchlora/distributed.h needs LibTorch's c10d with Gloo: the headers of
# Gloo (Debian's libgloo-dev; pytorch.org's archives ship them) and
# USE_C10D_GLOO on LibTorch's targets. Sets TORCHLORA_HAVE_GLOO.
macro(torchlora_find_gloo)
  find_path(TORCHLORA_GLOO_INCLUDE_DIR gloo/config.h HINTS ${TORCH_INCLUDE_DIRS})
  set(_torchlora_torch_definitions "")
  if(TARGET torch_cpu)
    get_target_property(_torchlora_torch_definitions torch_cpu
                        INTERFACE_COMPILE_DEFINITIONS)
  endif()
  if(TORCHLORA_GLOO_INCLUDE_DIR AND "USE_C10D_GLOO" IN_LIST _torchlora_torch_definitions)
    set(TORCHLORA_HAVE_GLOO ON)
  else()
    set(TORCHLORA_HAVE_GLOO OFF)
  endif()
endmacro()

# Under add_subdirectory, targets imported in this folder (torch, nlohmann)
# would be visible here only; the parent links them through
# torchlora::torchlora, so make them global.
macro(torchlora_share_imported_targets)
  if(NOT CMAKE_SOURCE_DIR STREQUAL CMAKE_CURRENT_SOURCE_DIR
     AND NOT CMAKE_VERSION VERSION_LESS 3.21)
    get_directory_property(_torchlora_imported IMPORTED_TARGETS)
    foreach(_target IN LISTS _torchlora_imported)
      get_target_property(_global ${_target} IMPORTED_GLOBAL)
      if(NOT _global)
        set_target_properties(${_target} PROPERTIES IMPORTED_GLOBAL TRUE)
      endif()
    endforeach()
  endif()
endmacro()

# GoogleTest: an installed package, else a source folder (Debian's googletest
# package puts one in /usr/src/googletest). TORCHLORA_GTEST_SOURCE_DIR, when
# set, wins: machines without an installed GoogleTest build it from there.
set(TORCHLORA_GTEST_SOURCE_DIR "" CACHE PATH
    "GoogleTest source folder to build the tests against (empty: find_package)")

function(torchlora_find_gtest)
  if(TARGET GTest::gtest_main)
    return()
  endif()
  set(source_dir "${TORCHLORA_GTEST_SOURCE_DIR}")
  if(NOT source_dir)
    find_package(GTest QUIET)
    if(TARGET GTest::gtest_main)
      message(STATUS "torchlora: GoogleTest ${GTest_VERSION} found installed")
      return()
    endif()
    set(source_dir "/usr/src/googletest")
  endif()
  if(NOT EXISTS "${source_dir}/CMakeLists.txt")
    message(FATAL_ERROR
      "torchlora: GoogleTest was not found, neither installed nor as sources "
      "in '${source_dir}'. On Debian run scripts/install-deps.sh "
      "(packages libgtest-dev, googletest), or set TORCHLORA_GTEST_SOURCE_DIR "
      "to a GoogleTest source folder.")
  endif()
  message(STATUS "torchlora: building GoogleTest from ${source_dir}")
  set(BUILD_GMOCK OFF CACHE BOOL "" FORCE)
  set(INSTALL_GTEST OFF CACHE BOOL "" FORCE)
  add_subdirectory("${source_dir}" "${PROJECT_BINARY_DIR}/_deps/googletest"
                   EXCLUDE_FROM_ALL)
  if(NOT TARGET GTest::gtest_main)
    add_library(GTest::gtest_main ALIAS gtest_main)
  endif()
endfunction()

# A dependency of an example, test or benchmark is missing: an error where
# the build promises everything (TORCHLORA_REQUIRE_ALL_DEPS, on in the
# presets that CI uses), else a warning, the target is left out and each
# test named after TESTS is registered as a skipped test giving the reason.
#   torchlora_missing_dependency("text" "more text" [TESTS name...])
option(TORCHLORA_REQUIRE_ALL_DEPS
  "Fail when a dependency of an example, test or benchmark is missing" OFF)
function(torchlora_missing_dependency)
  cmake_parse_arguments(PARSE_ARGV 0 missing "" "" "TESTS")
  string(CONCAT text ${missing_UNPARSED_ARGUMENTS})
  if(TORCHLORA_REQUIRE_ALL_DEPS)
    message(FATAL_ERROR "torchlora: ${text}")
  endif()
  message(WARNING "torchlora: ${text}")
  foreach(test IN LISTS missing_TESTS)
    torchlora_add_skipped_test(${test} "${text}")
  endforeach()
endfunction()

# A CTest test NAME that cannot run here: it prints REASON and CTest counts it
# as skipped (listed under "The following tests did not run"), so a missing
# tool never makes a test disappear silently.
function(torchlora_add_skipped_test name reason)
  if(NOT TORCHLORA_BUILD_TESTS)
    return() # the real test would not exist either
  endif()
  add_test(NAME ${name} COMMAND "${CMAKE_COMMAND}" -E echo "SKIPPED: ${reason}")
  set_tests_properties(${name} PROPERTIES SKIP_REGULAR_EXPRESSION "SKIPPED:")
endfunction()

# Registers the tests of the GoogleTest binary TARGET with CTest, one CTest
# test per GoogleTest suite (see cmake/ListGTestSuites.cmake), listed after
# each build. Arguments: PREFIX (of the CTest names), TIMEOUT (seconds, per
# suite), WORKING_DIRECTORY.
function(torchlora_add_gtest_suites target)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "PREFIX;TIMEOUT;WORKING_DIRECTORY" "")
  set(listed "${CMAKE_CURRENT_BINARY_DIR}/${target}_suites.cmake")
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${CMAKE_COMMAND}"
      "-DPROGRAM=$<TARGET_FILE:${target}>" "-DOUT=${listed}"
      "-DPREFIX=${arg_PREFIX}" "-DTIMEOUT=${arg_TIMEOUT}"
      "-DWORKING_DIRECTORY=${arg_WORKING_DIRECTORY}"
      -P "${PROJECT_SOURCE_DIR}/cmake/ListGTestSuites.cmake"
    BYPRODUCTS "${listed}"
    VERBATIM)
  set(include_file "${CMAKE_CURRENT_BINARY_DIR}/${target}_include.cmake")
  file(WRITE "${include_file}"
    "if(EXISTS [=[${listed}]=])\n"
    "  include([=[${listed}]=])\n"
    "else()\n"
    "  add_test([=[${arg_PREFIX}${target}_NOT_BUILT]=] [=[${target}_NOT_BUILT]=])\n"
    "endif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${include_file}")
endfunction()

# A Python that imports torch (Debian's python3-torch), for the TorchScript
# fixtures and example: TORCHLORA_PYTHON_TORCH, empty when none is found.
# /usr/bin/python3 comes first: a python3 earlier on PATH (a virtual
# environment, pyenv) may lack Debian's packages.
function(torchlora_find_python_torch)
  if(DEFINED CACHE{TORCHLORA_PYTHON_TORCH} AND TORCHLORA_PYTHON_TORCH)
    return()
  endif()
  find_program(path_python3 NAMES python3)
  set(found "")
  foreach(candidate /usr/bin/python3 ${path_python3})
    if(EXISTS "${candidate}")
      execute_process(COMMAND "${candidate}" -c "import torch"
                      RESULT_VARIABLE rc OUTPUT_QUIET ERROR_QUIET)
      if(rc EQUAL 0)
        set(found "${candidate}")
        break()
      endif()
    endif()
  endforeach()
  set(TORCHLORA_PYTHON_TORCH "${found}" CACHE FILEPATH
      "A Python that imports torch (TorchScript fixtures and example)" FORCE)
endfunction()
