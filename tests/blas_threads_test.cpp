// The BLAS threading check (blas_threads.h): which set-ups get the warning,
// that it is sent once, and what the process really has. The warning in a
// real process with each OpenBLAS build is checked by the CTest tests
// blas.process_* (cmake/CheckBlasWarning.cmake).
#include <torchlora/torchlora.h>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_blas_threads_test {

namespace {

using torchlora::BlasParallel;
using torchlora::BlasThreads;

BlasThreads fake(
    BlasParallel parallel,
    int openblas_threads,
    int torch_threads,
    std::string config =
        "OpenBLAS 0.3.29 DYNAMIC_ARCH NO_AFFINITY Zen "
        "MAX_THREADS=64") {
  BlasThreads blas;
  blas.parallel = parallel;
  blas.openblas_config = std::move(config);
  blas.openblas_threads = openblas_threads;
  blas.torch_threads = torch_threads;
  return blas;
}

TEST(BlasThreads, WarnsForThePthreadBuildNextToLibTorchThreads) {
  const auto warning =
      torchlora::blas_threads_warning(fake(BlasParallel::pthreads, 2, 2));
  ASSERT_FALSE(warning.empty());
  EXPECT_EQ(warning.rfind("torchlora: ", 0), 0u) << warning;
  // Names what it found and both fixes.
  for (const char* part :
       {"pthread build of OpenBLAS",
        "OpenBLAS 0.3.29 DYNAMIC_ARCH",
        "with 2 threads of its own",
        "LibTorch's 2 OpenMP threads",
        "libopenblas0-openmp",
        "update-alternatives",
        "OPENBLAS_NUM_THREADS=1"}) {
    EXPECT_NE(warning.find(part), std::string::npos) << part << "\n" << warning;
  }
  EXPECT_NE(
      torchlora::blas_threads_warning(fake(BlasParallel::pthreads, 64, 16))
          .find("with 64 threads of its own, next to LibTorch's 16"),
      std::string::npos);
}

TEST(BlasThreads, NoWarningWhenAllIsWell) {
  struct Case {
    BlasThreads blas;
    const char* why;
  };
  const std::vector<Case> cases = {
      {fake(BlasParallel::openmp, 2, 2), "OpenMP build"},
      {fake(BlasParallel::openmp, 64, 64), "OpenMP build, many threads"},
      {fake(BlasParallel::sequential, 1, 2), "sequential build"},
      {fake(BlasParallel::pthreads, 1, 2), "OPENBLAS_NUM_THREADS=1"},
      {fake(BlasParallel::pthreads, 2, 1), "one LibTorch thread"},
      {fake(BlasParallel::none, 0, 2, ""), "no OpenBLAS (e.g. MKL)"},
      {fake(BlasParallel::unknown, 2, 2), "an unknown build"},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(torchlora::blas_threads_warning(c.blas), "") << c.why;
  }
}

TEST(BlasThreads, WarnsOncePerFlag) {
  std::atomic<bool> warned{false};
  std::vector<std::string> seen;
  const auto sink = [&](const std::string& text) { seen.push_back(text); };
  // All is well: nothing sent, and the flag stays free for a real warning.
  EXPECT_FALSE(torchlora::detail::warn_about_blas_threads_once(
      warned, fake(BlasParallel::openmp, 2, 2), sink));
  EXPECT_TRUE(seen.empty());
  EXPECT_FALSE(warned.load());
  EXPECT_TRUE(torchlora::detail::warn_about_blas_threads_once(
      warned, fake(BlasParallel::pthreads, 2, 2), sink));
  EXPECT_FALSE(torchlora::detail::warn_about_blas_threads_once(
      warned, fake(BlasParallel::pthreads, 2, 2), sink));
  EXPECT_FALSE(torchlora::detail::warn_about_blas_threads_once(
      warned, fake(BlasParallel::pthreads, 4, 4), sink));
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(
      seen.front(),
      torchlora::blas_threads_warning(fake(BlasParallel::pthreads, 2, 2)));
}

TEST(BlasThreads, MapsOpenBlasAnswers) {
  using torchlora::detail::blas_parallel_from_openblas;
  EXPECT_EQ(blas_parallel_from_openblas(0), BlasParallel::sequential);
  EXPECT_EQ(blas_parallel_from_openblas(1), BlasParallel::pthreads);
  EXPECT_EQ(blas_parallel_from_openblas(2), BlasParallel::openmp);
  EXPECT_EQ(blas_parallel_from_openblas(3), BlasParallel::unknown);
  EXPECT_EQ(blas_parallel_from_openblas(-1), BlasParallel::unknown);
}

TEST(BlasThreads, DescribesTheSetUp) {
  EXPECT_EQ(
      torchlora::describe(fake(BlasParallel::openmp, 2, 1, "OpenBLAS 0.3.21")),
      "OpenBLAS 0.3.21 (OpenMP build), 2 OpenBLAS threads, 1 LibTorch thread");
  EXPECT_EQ(
      torchlora::describe(fake(BlasParallel::pthreads, 1, 4, "")),
      "OpenBLAS (pthread build), 1 OpenBLAS thread, 4 LibTorch threads");
  EXPECT_EQ(
      torchlora::describe(fake(BlasParallel::none, 0, 8, "")),
      "no OpenBLAS, 8 LibTorch threads");
}

// What this process really has, read through the loader. Run alone by the
// CTest tests blas.process_* with TORCHLORA_EXPECT_BLAS naming the OpenBLAS
// build they put first on the library path; they also count the warnings
// that the two adapters below print (one with the pthread build, none
// otherwise).
TEST(BlasThreads, ReadsThisProcess) {
  const auto blas = torchlora::blas_threads();
  EXPECT_EQ(blas.torch_threads, at::get_num_threads());
  if (blas.parallel != BlasParallel::none) {
    EXPECT_NE(blas.openblas_config.find("OpenBLAS"), std::string::npos)
        << blas.openblas_config;
    EXPECT_GE(blas.openblas_threads, 1);
  }
  const char* expected = std::getenv("TORCHLORA_EXPECT_BLAS");
  if (expected != nullptr) {
    const std::string want = expected;
    const auto parallel = want == "openblas-openmp" ? BlasParallel::openmp
        : want == "openblas-pthread"                ? BlasParallel::pthreads
                                                    : BlasParallel::unknown;
    ASSERT_NE(parallel, BlasParallel::unknown)
        << "TORCHLORA_EXPECT_BLAS=" << want
        << " (expected openblas-openmp or openblas-pthread)";
    EXPECT_EQ(blas.parallel, parallel) << torchlora::describe(blas);
  }
  // Two adapters: the check runs at the first and not again.
  torchlora::LoRALinear first(
      torch::nn::Linear(8, 4), torchlora::LoRAOptions(2));
  torchlora::LoRALinear second(
      torch::nn::Linear(8, 4), torchlora::LoRAOptions(2));
  EXPECT_EQ(first->adapter_names().size(), 1u);
  EXPECT_EQ(second->adapter_names().size(), 1u);
  std::cout << "blas: " << torchlora::describe(blas) << "\n";
}

} // namespace

} // namespace torchlora_blas_threads_test
