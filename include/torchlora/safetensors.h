#pragma once

#include <torchlora/detail/atomic_file.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/read_file.h>
#include <torchlora/detail/safetensors_format.h>

#include <torch/ordered_dict.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace torchlora {

/// Reading and writing safetensors files (the format of Python's
/// `safetensors` and of peft's adapters).
namespace safetensors {

/// The string pairs of a file's `__metadata__`.
using Metadata = std::map<std::string, std::string>;

/// Named tensors, in file order.
using Tensors = torch::OrderedDict<std::string, torch::Tensor>;

namespace detail {

inline torch::Dtype to_torch(DType dtype) {
  switch (dtype) {
    case DType::F64:
      return torch::kFloat64;
    case DType::F32:
      return torch::kFloat32;
    case DType::F16:
      return torch::kFloat16;
    case DType::BF16:
      return torch::kBFloat16;
    case DType::I64:
      return torch::kInt64;
    case DType::I32:
      return torch::kInt32;
    case DType::I16:
      return torch::kInt16;
    case DType::I8:
      return torch::kInt8;
    case DType::U8:
      return torch::kUInt8;
    case DType::BOOL:
      return torch::kBool;
  }
  return torch::kFloat32;
}

inline DType from_torch(torch::Dtype dtype, const std::string& name) {
  for (const auto& info : dtype_table()) {
    if (to_torch(info.dtype) == dtype) {
      return info.dtype;
    }
  }
  TORCHLORA_CHECK(
      false,
      "safetensors cannot store tensor \"",
      name,
      "\" of dtype ",
      dtype,
      " (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
  return DType::F32;
}

inline void check_little_endian() {
  const uint16_t probe = 1;
  uint8_t first = 0;
  std::memcpy(&first, &probe, 1);
  TORCHLORA_CHECK(
      first == 1, "safetensors files are little-endian; this machine is not");
}

/// Writes `tensors` and `metadata` as a safetensors file to `out`.
inline void write(
    std::ostream& out,
    const Tensors& tensors,
    const Metadata& metadata) {
  check_little_endian();
  std::vector<TensorInfo> infos;
  std::vector<torch::Tensor> contiguous;
  for (const auto& item : tensors) {
    const auto& tensor = item.value();
    TORCHLORA_CHECK(
        tensor.defined(),
        "safetensors cannot store tensor \"",
        item.key(),
        "\": it is undefined");
    TensorInfo info;
    info.name = item.key();
    info.dtype = from_torch(tensor.scalar_type(), item.key());
    for (const auto dim : tensor.sizes()) {
      info.shape.push_back(static_cast<uint64_t>(dim));
    }
    infos.push_back(info);
    contiguous.push_back(tensor.detach().to(torch::kCPU).contiguous());
  }
  std::string header;
  try {
    header = format_header(
        infos,
        std::vector<std::pair<std::string, std::string>>(
            metadata.begin(), metadata.end()));
  } catch (const FormatError& error) {
    TORCHLORA_CHECK(false, "safetensors: ", error.what());
  }
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (size_t i = 0; i < infos.size(); ++i) {
    out.write(
        static_cast<const char*>(contiguous[i].data_ptr()),
        static_cast<std::streamsize>(infos[i].end - infos[i].begin));
  }
}

} // namespace detail

namespace detail {

/// The tensors of the file bytes `[data, data + size)`; `origin` names them
/// in messages ("the given bytes" or the file's path).
inline Tensors read_tensors(
    const uint8_t* bytes,
    size_t size,
    const std::string& origin,
    Metadata* metadata) {
  check_little_endian();
  Header header;
  std::string problem;
  try {
    header = parse(bytes, size);
  } catch (const FormatError& error) {
    problem = error.what();
  }
  TORCHLORA_CHECK(
      problem.empty(), origin, " is not a valid safetensors file: ", problem);
  Tensors tensors;
  for (const auto& info : header.tensors) {
    const std::vector<int64_t> shape(info.shape.begin(), info.shape.end());
    auto tensor =
        torch::empty(shape, torch::TensorOptions().dtype(to_torch(info.dtype)));
    if (info.end > info.begin) {
      std::memcpy(
          tensor.data_ptr(),
          bytes + header.data_start + info.begin,
          info.end - info.begin);
    }
    tensors.insert(info.name, std::move(tensor));
  }
  if (metadata != nullptr) {
    metadata->clear();
    metadata->insert(header.metadata.begin(), header.metadata.end());
  }
  return tensors;
}

} // namespace detail

/// Reads the tensors of a safetensors file held in memory; each returned
/// tensor owns a copy of its bytes. Every violation of the format is a
/// `torchlora:` error, and no byte outside `[data, data + size)` is read.
inline Tensors load_bytes(
    const void* data,
    size_t size,
    Metadata* metadata = nullptr) {
  return detail::read_tensors(
      static_cast<const uint8_t*>(data), size, "the given bytes", metadata);
}

/// Reads a safetensors file: its tensors in file order (each owning its
/// memory, on the CPU) and, if asked, its `__metadata__`. A path that is
/// not a readable regular file (a directory, a FIFO, ...) or a file that
/// changes size while it is read is a `torchlora:` error.
///
/// Example:
/// ```
/// auto tensors = torchlora::safetensors::load("adapter_model.safetensors");
/// torch::Tensor A = tensors["base_model.model.fc.lora_A.weight"];
/// ```
inline Tensors load(const std::string& path, Metadata* metadata = nullptr) {
  const auto bytes =
      torchlora::detail::read_regular_file(path, "safetensors file");
  return detail::read_tensors(
      reinterpret_cast<const uint8_t*>(bytes.data()),
      bytes.size(),
      "'" + path + "'",
      metadata);
}

/// The bytes of a safetensors file holding `tensors` and `metadata`.
inline std::string save_bytes(
    const Tensors& tensors,
    const Metadata& metadata = {}) {
  std::ostringstream out(std::ios::binary);
  detail::write(out, tensors, metadata);
  return std::move(out).str();
}

/// Writes `tensors` (any device, dtype F64/F32/F16/BF16/I64/I32/I16/I8/U8/
/// BOOL) and `metadata` to a safetensors file at `path`, creating its folder.
/// The file is written next to `path` and renamed over it at the end, so a
/// failed save never leaves a half-written file where a good one was.
///
/// Example:
/// ```
/// torchlora::safetensors::save("copy.safetensors", tensors, {{"format",
/// "pt"}});
/// ```
inline void save(
    const std::string& path,
    const Tensors& tensors,
    const Metadata& metadata = {}) {
  torchlora::detail::write_file_atomically(
      path, [&](std::ostream& out) { detail::write(out, tensors, metadata); });
}

} // namespace safetensors
} // namespace torchlora
