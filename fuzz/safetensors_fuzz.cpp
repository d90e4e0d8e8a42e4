// libFuzzer target for the safetensors reader: any bytes must give either a
// header whose every tensor lies inside the buffer, or a FormatError. A
// valid header is written again, with the tensors' bytes, and must parse to
// the same metadata and tensors (names, shapes, dtypes, offsets, bytes).
//
//   cmake -S fuzz -B build/fuzz -DCMAKE_CXX_COMPILER=clang++
//   cmake --build build/fuzz
//   build/fuzz/safetensors_fuzz -dict=fuzz/safetensors.dict build/corpus
//   fuzz/corpus
#include <torchlora/detail/safetensors_format.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace st = torchlora::safetensors::detail;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  st::Header header;
  try {
    header = st::parse(data, size);
  } catch (const st::FormatError&) {
    return 0;
  }
  // Every tensor lies inside the buffer; reading it must be in bounds.
  uint64_t checksum = 0;
  for (const auto& tensor : header.tensors) {
    if (header.data_start + tensor.end > size) {
      std::abort();
    }
    for (uint64_t i = tensor.begin; i < tensor.end; ++i) {
      checksum += data[header.data_start + i];
    }
  }
  // Writing the header again and parsing it gives the same tensors.
  auto tensors = header.tensors;
  std::string file;
  try {
    file = st::format_header(tensors, header.metadata);
  } catch (const st::FormatError&) {
    return 0; // e.g. a name that is not valid UTF-8 for the writer
  }
  for (const auto& tensor : header.tensors) {
    file.append(
        reinterpret_cast<const char*>(data + header.data_start + tensor.begin),
        tensor.end - tensor.begin);
  }
  const auto again =
      st::parse(reinterpret_cast<const uint8_t*>(file.data()), file.size());
  if (again.tensors.size() != header.tensors.size() ||
      again.metadata != header.metadata) {
    std::abort();
  }
  // Same tensors in the same order (both parses sort by offset), at the
  // offsets format_header gave them, holding the same bytes.
  const auto* written = reinterpret_cast<const uint8_t*>(file.data());
  for (size_t i = 0; i < again.tensors.size(); ++i) {
    const auto& read = again.tensors[i];
    const auto& original = header.tensors[i];
    if (read.name != original.name || read.shape != original.shape ||
        read.dtype != original.dtype || read.begin != tensors[i].begin ||
        read.end != tensors[i].end ||
        read.end - read.begin != original.end - original.begin ||
        std::memcmp(
            written + again.data_start + read.begin,
            data + header.data_start + original.begin,
            read.end - read.begin) != 0) {
      std::abort();
    }
  }
  return checksum == 0xFFFFFFFFFFFFFFFFull ? 1 : 0;
}
