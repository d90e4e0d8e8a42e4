#pragma once

/// How the BLAS that LibTorch calls runs its threads, and a one-time warning
/// for the set-up that makes every matrix product slow: the pthread build of
/// OpenBLAS next to LibTorch's own OpenMP threads. Both start a pool of
/// worker threads per core; on a small machine they compete for the cores
/// and spin against each other (measured on Debian 13: a training run 6 to
/// 13 times slower). The OpenMP build of OpenBLAS shares LibTorch's pool.
///
/// torchlora looks once per process, when the first adapter is created, and
/// warns (with `TORCH_WARN`) only where that set-up is present.
///
/// Example:
/// ```
/// const auto blas = torchlora::blas_threads();
/// std::cout << torchlora::describe(blas) << "\n";
/// // OpenBLAS 0.3.21 ... (OpenMP build), 2 OpenBLAS threads, 2 LibTorch
/// threads
/// ```

#include <torchlora/detail/check.h>

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <functional>
#include <sstream>
#include <string>

#if defined(__has_include)
#if __has_include(<dlfcn.h>)
#include <dlfcn.h>
#define TORCHLORA_HAVE_DLSYM 1
#endif
#endif

namespace torchlora {

/// Which threads the OpenBLAS in this process uses (`openblas_get_parallel`).
enum class BlasParallel {
  none, ///< the process has no OpenBLAS (another BLAS, e.g. MKL)
  sequential, ///< OpenBLAS built without threads
  pthreads, ///< OpenBLAS with its own pool of pthreads
  openmp, ///< OpenBLAS on OpenMP, sharing LibTorch's threads
  unknown, ///< an answer this version does not know
};

/// The BLAS threading of this process, as `blas_threads()` reads it.
struct BlasThreads {
  /// The OpenBLAS build in use (`BlasParallel::none` without OpenBLAS).
  BlasParallel parallel = BlasParallel::none;
  /// `openblas_get_config()`: version, target and options; empty without
  /// OpenBLAS.
  std::string openblas_config;
  /// `openblas_get_num_threads()`; 0 without OpenBLAS.
  int openblas_threads = 0;
  /// LibTorch's intra-op threads (`at::get_num_threads()`).
  int torch_threads = 1;
};

/// The name of a `BlasParallel` value, e.g. "pthread build".
inline const char* to_string(BlasParallel parallel) {
  switch (parallel) {
    case BlasParallel::none:
      return "no OpenBLAS";
    case BlasParallel::sequential:
      return "sequential build";
    case BlasParallel::pthreads:
      return "pthread build";
    case BlasParallel::openmp:
      return "OpenMP build";
    case BlasParallel::unknown:
      break;
  }
  return "unknown build";
}

namespace detail {

/// `openblas_get_parallel()`'s answer (0, 1, 2) as a `BlasParallel`.
inline BlasParallel blas_parallel_from_openblas(int answer) {
  switch (answer) {
    case 0:
      return BlasParallel::sequential;
    case 1:
      return BlasParallel::pthreads;
    case 2:
      return BlasParallel::openmp;
    default:
      return BlasParallel::unknown;
  }
}

/// A function of the process's OpenBLAS, looked up by name; null where the
/// process has none (or no dynamic loader).
template <typename Function>
Function* openblas_function(const char* name) {
#ifdef TORCHLORA_HAVE_DLSYM
  return reinterpret_cast<Function*>(dlsym(RTLD_DEFAULT, name));
#else
  (void)name;
  return nullptr;
#endif
}

} // namespace detail

/// Reads this process's BLAS threading: which OpenBLAS build LibTorch calls
/// (looked up by symbol, so a process without OpenBLAS reports
/// `BlasParallel::none`), its thread count and LibTorch's.
inline BlasThreads blas_threads() {
  BlasThreads result;
  result.torch_threads = at::get_num_threads();
  const auto get_parallel =
      detail::openblas_function<int()>("openblas_get_parallel");
  if (get_parallel == nullptr) {
    return result;
  }
  result.parallel = detail::blas_parallel_from_openblas(get_parallel());
  if (const auto get_threads =
          detail::openblas_function<int()>("openblas_get_num_threads")) {
    result.openblas_threads = get_threads();
  }
  if (const auto get_config =
          detail::openblas_function<char*()>("openblas_get_config")) {
    if (const char* config = get_config()) {
      result.openblas_config = config;
    }
  }
  return result;
}

/// One line for logs and benchmark reports, e.g. "OpenBLAS 0.3.21 ...
/// (OpenMP build), 2 OpenBLAS threads, 2 LibTorch threads".
inline std::string describe(const BlasThreads& blas) {
  std::ostringstream text;
  if (blas.parallel == BlasParallel::none) {
    text << "no OpenBLAS";
  } else {
    text << (blas.openblas_config.empty() ? std::string("OpenBLAS")
                                          : blas.openblas_config)
         << " (" << to_string(blas.parallel) << "), " << blas.openblas_threads
         << " OpenBLAS thread" << (blas.openblas_threads == 1 ? "" : "s");
  }
  text << ", " << blas.torch_threads << " LibTorch thread"
       << (blas.torch_threads == 1 ? "" : "s");
  return text.str();
}

/// The warning for `blas`, or "" when its threads cannot compete: only the
/// pthread build of OpenBLAS with more than one thread, next to more than
/// one LibTorch thread, gets one.
inline std::string blas_threads_warning(const BlasThreads& blas) {
  if (blas.parallel != BlasParallel::pthreads || blas.openblas_threads < 2 ||
      blas.torch_threads < 2) {
    return "";
  }
  std::ostringstream text;
  text << TORCHLORA_PREFIX "this process calls the pthread build of OpenBLAS ("
       << (blas.openblas_config.empty() ? std::string("OpenBLAS")
                                        : blas.openblas_config)
       << ") with " << blas.openblas_threads
       << " threads of its own, next to LibTorch's " << blas.torch_threads
       << " OpenMP threads. The two pools compete for the cores and matrix "
          "products can run many times slower (6 to 13x measured on Debian "
          "13). Fix it with either: install the OpenMP build of OpenBLAS "
          "(Debian: apt-get install libopenblas0-openmp, then select it with "
          "update-alternatives, as torchlora's scripts/install-deps.sh does), "
          "or set OPENBLAS_NUM_THREADS=1 in the environment.";
  return text.str();
}

namespace detail {

/// Sends `blas_threads_warning(blas)` to `sink` unless `warned` is already
/// set, and sets it; returns whether it warned. Nothing is sent when all is
/// well.
inline bool warn_about_blas_threads_once(
    std::atomic<bool>& warned,
    const BlasThreads& blas,
    const std::function<void(const std::string&)>& sink) {
  const auto warning = blas_threads_warning(blas);
  if (warning.empty() || warned.exchange(true)) {
    return false;
  }
  sink(warning);
  return true;
}

/// Called when an adapter is created: the first call of the process reads
/// `blas_threads()` and warns (`TORCH_WARN`) if needed; later calls cost an
/// atomic load.
inline void check_blas_threads_once() {
  static std::atomic<bool> checked{false};
  if (checked.exchange(true)) {
    return;
  }
  static std::atomic<bool> warned{false};
  warn_about_blas_threads_once(
      warned, blas_threads(), [](const std::string& warning) {
        TORCH_WARN(warning);
      });
}

} // namespace detail
} // namespace torchlora
