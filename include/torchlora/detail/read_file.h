#pragma once

// Reading a whole file with `torchlora:` errors for everything that is not a
// readable regular file of a stable size. Not part of the API.

#include <torchlora/detail/check.h>

#include <c10/util/Exception.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <utility>

namespace torchlora {
namespace detail {

/// "a directory", "a FIFO", ... for a file status that is not a regular
/// file.
inline const char* file_kind(const std::filesystem::file_status& status) {
  namespace fs = std::filesystem;
  switch (status.type()) {
    case fs::file_type::directory:
      return "a directory";
    case fs::file_type::fifo:
      return "a FIFO";
    case fs::file_type::socket:
      return "a socket";
    case fs::file_type::block:
      return "a block device";
    case fs::file_type::character:
      return "a character device";
    default:
      return "not a regular file";
  }
}

/// The bytes of a file, not zero-filled before they are read.
class FileBytes {
 public:
  FileBytes() = default;
  FileBytes(std::unique_ptr<char[]> bytes, size_t size)
      : bytes_(std::move(bytes)), size_(size) {}
  const char* data() const {
    return bytes_.get();
  }
  size_t size() const {
    return size_;
  }

 private:
  std::unique_ptr<char[]> bytes_;
  size_t size_ = 0;
};

/// Reads `in` to its end, expecting `expected` bytes (the file's size when
/// it was opened): a file that shrank or grew meanwhile is an error rather
/// than half of one file and half of another. Nothing is allocated beyond
/// `expected`, which the caller took from the file system; too little
/// memory for it is an error too.
inline FileBytes read_expected_bytes(
    std::istream& in,
    std::uintmax_t expected,
    const std::string& path,
    const char* what) {
  std::unique_ptr<char[]> bytes;
  if (expected <= std::numeric_limits<size_t>::max() &&
      expected <= static_cast<std::uintmax_t>(
                      std::numeric_limits<std::streamsize>::max())) {
    bytes.reset(new (std::nothrow) char[static_cast<size_t>(expected) + 1]);
  }
  TORCHLORA_CHECK(
      bytes != nullptr,
      "cannot read ",
      what,
      " '",
      path,
      "': not enough memory for its ",
      expected,
      " bytes");
  in.read(bytes.get(), static_cast<std::streamsize>(expected));
  const auto got = static_cast<std::uintmax_t>(in.gcount());
  TORCHLORA_CHECK(
      !in.bad(),
      "reading ",
      what,
      " '",
      path,
      "' failed: ",
      std::strerror(errno));
  bool grew = false;
  if (got == expected) {
    char extra = 0;
    grew = static_cast<bool>(in.get(extra));
  }
  TORCHLORA_CHECK(
      !(grew && expected == 0),
      "cannot read ",
      what,
      " '",
      path,
      "': it says it holds 0 bytes but has content (a file under /proc or "
      "/sys?); copy it to a regular file first");
  TORCHLORA_CHECK(
      got == expected && !grew,
      what,
      " '",
      path,
      "' changed size while it was read (",
      expected,
      " bytes when opened, ",
      grew ? "more" : std::to_string(got),
      " read); read it again once nothing writes to it");
  return FileBytes(std::move(bytes), static_cast<size_t>(expected));
}

/// The bytes of the regular file at `path`; `what` names it in errors
/// ("safetensors file"). A missing or unreadable path, a directory, a FIFO
/// or a device, and a file that changes size while it is read are
/// `torchlora:` errors that name the path and the reason.
inline FileBytes read_regular_file(const std::string& path, const char* what) {
  namespace fs = std::filesystem;
  std::error_code error;
  const auto status = fs::status(path, error);
  TORCHLORA_CHECK(
      !error, "cannot read ", what, " '", path, "': ", error.message());
  TORCHLORA_CHECK(
      fs::is_regular_file(status),
      "cannot read ",
      what,
      " '",
      path,
      "': it is ",
      file_kind(status),
      ", not a regular file");
  std::ifstream in(path, std::ios::binary);
  TORCHLORA_CHECK(
      in.is_open(),
      "cannot read ",
      what,
      " '",
      path,
      "': ",
      std::strerror(errno));
  const auto size = fs::file_size(path, error);
  TORCHLORA_CHECK(
      !error, "cannot read ", what, " '", path, "': ", error.message());
  return read_expected_bytes(in, size, path, what);
}

} // namespace detail
} // namespace torchlora
