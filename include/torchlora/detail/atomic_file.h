#pragma once

// Writing a file so that a failure never leaves a half-written file where a
// good one was: write next to it, then rename over it. Not part of the API.

#include <torchlora/detail/check.h>

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>

namespace torchlora {
namespace detail {

/// Creates the folder of `path`, lets `write` fill a new file next to
/// `path`, and renames it over `path`. A folder that cannot be created, a
/// short write (disk full) or a failed rename is a `torchlora:` error, and
/// the temporary file is removed.
inline void write_file_atomically(
    const std::string& path,
    const std::function<void(std::ostream&)>& write) {
  namespace fs = std::filesystem;
  const fs::path target(path);
  std::error_code error;
  if (target.has_parent_path()) {
    fs::create_directories(target.parent_path(), error);
    TORCHLORA_CHECK(
        !error,
        "cannot create folder '",
        target.parent_path().string(),
        "' for '",
        path,
        "': ",
        error.message());
  }
  std::random_device random;
  const auto temporary = target.string() + ".tmp-" + std::to_string(random());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    TORCHLORA_CHECK(
        out.good(), "cannot write '", temporary, "': ", std::strerror(errno));
    try {
      write(out);
    } catch (...) {
      out.close();
      fs::remove(temporary, error);
      throw;
    }
    out.close();
    if (!out.good()) {
      fs::remove(temporary, error);
      TORCHLORA_CHECK(
          false,
          "writing '",
          path,
          "' failed (a short write: is the disk full?)");
    }
  }
  fs::rename(temporary, target, error);
  if (error) {
    const auto message = error.message();
    fs::remove(temporary, error);
    TORCHLORA_CHECK(
        false, "cannot move the new file to '", path, "': ", message);
  }
}

} // namespace detail
} // namespace torchlora
