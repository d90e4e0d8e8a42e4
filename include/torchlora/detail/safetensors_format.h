#pragma once

// The safetensors file format without LibTorch: parsing and validating a
// file's bytes, and writing a header. The fuzz target drives `parse`.
// Not part of the API: use <torchlora/safetensors.h>.
//
// Layout: 8 bytes little-endian u64 N, N bytes of JSON, the data block.
// JSON: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [b, e]},
//        ..., "__metadata__": {"key": "value"}}, offsets relative to the
// data block.

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

namespace torchlora {
namespace safetensors {
namespace detail {

/// A file or a call that breaks the format; the message says how.
class FormatError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The element types torchlora reads and writes.
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL };

struct DTypeInfo {
  DType dtype;
  const char* name;
  uint64_t size;
};

inline const std::vector<DTypeInfo>& dtype_table() {
  static const std::vector<DTypeInfo> table = {
      {DType::F64, "F64", 8},
      {DType::F32, "F32", 4},
      {DType::F16, "F16", 2},
      {DType::BF16, "BF16", 2},
      {DType::I64, "I64", 8},
      {DType::I32, "I32", 4},
      {DType::I16, "I16", 2},
      {DType::I8, "I8", 1},
      {DType::U8, "U8", 1},
      {DType::BOOL, "BOOL", 1},
  };
  return table;
}

inline const DTypeInfo& info_of(DType dtype) {
  for (const auto& info : dtype_table()) {
    if (info.dtype == dtype) {
      return info;
    }
  }
  throw FormatError("unknown dtype");
}

inline std::optional<DType> dtype_from_name(const std::string& name) {
  for (const auto& info : dtype_table()) {
    if (name == info.name) {
      return info.dtype;
    }
  }
  return std::nullopt;
}

/// One tensor entry of a header.
struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<uint64_t> shape;
  /// Byte range in the data block: [begin, end).
  uint64_t begin = 0;
  uint64_t end = 0;
};

/// A parsed, validated header.
struct Header {
  /// Tensors in data-block order.
  std::vector<TensorInfo> tensors;
  std::vector<std::pair<std::string, std::string>> metadata;
  /// Where the data block starts in the file: 8 + N.
  uint64_t data_start = 0;
};

/// The largest header accepted, as the reference implementation (100 MB).
constexpr uint64_t kMaxHeaderBytes = 100000000;

/// The most dimensions a tensor may have.
constexpr size_t kMaxDims = 64;

inline uint64_t read_u64_le(const uint8_t* bytes) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) {
    value = (value << 8) | bytes[i];
  }
  return value;
}

inline void write_u64_le(uint64_t value, char* bytes) {
  for (int i = 0; i < 8; ++i) {
    bytes[i] = static_cast<char>((value >> (8 * i)) & 0xff);
  }
}

/// `a * b`, or an error when it does not fit in 64 bits.
inline uint64_t checked_multiply(
    uint64_t a,
    uint64_t b,
    const std::string& what) {
  if (a != 0 && b > std::numeric_limits<uint64_t>::max() / a) {
    throw FormatError(what + " overflows 64 bits");
  }
  return a * b;
}

/// A JSON value for a message, cut to a readable length.
inline std::string shown(const nlohmann::ordered_json& value) {
  auto text = value.dump();
  return text.size() <= 60 ? text : text.substr(0, 57) + "...";
}

inline uint64_t unsigned_of(
    const nlohmann::ordered_json& value,
    const std::string& what) {
  if (!value.is_number_unsigned()) {
    throw FormatError(
        what + " must be an unsigned integer, got " + shown(value));
  }
  return value.get<uint64_t>();
}

/// The number of elements of `shape`, checked for overflow.
inline uint64_t element_count(
    const std::vector<uint64_t>& shape,
    const std::string& name) {
  uint64_t count = 1;
  for (const auto dim : shape) {
    count =
        checked_multiply(count, dim, "the shape of tensor \"" + name + "\"");
  }
  return count;
}

inline TensorInfo parse_entry(
    const std::string& name,
    const nlohmann::ordered_json& entry) {
  if (!entry.is_object()) {
    throw FormatError(
        "entry \"" + name + "\" must be an object, got " + shown(entry));
  }
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(field)) {
      throw FormatError("entry \"" + name + "\" has no \"" + field + "\"");
    }
  }
  TensorInfo info;
  info.name = name;
  const auto& dtype = entry["dtype"];
  if (!dtype.is_string()) {
    throw FormatError(
        "the dtype of \"" + name + "\" must be a string, got " + shown(dtype));
  }
  const auto known = dtype_from_name(dtype.get<std::string>());
  if (!known) {
    throw FormatError(
        "tensor \"" + name + "\" has an unsupported dtype " + shown(dtype) +
        " (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)");
  }
  info.dtype = *known;
  const auto& shape = entry["shape"];
  if (!shape.is_array()) {
    throw FormatError(
        "the shape of \"" + name + "\" must be an array, got " + shown(shape));
  }
  if (shape.size() > kMaxDims) {
    throw FormatError(
        "tensor \"" + name + "\" has " + std::to_string(shape.size()) +
        " dimensions, more than " + std::to_string(kMaxDims));
  }
  // Tensors index with int64: each dimension, and the product of them all
  // with zeros counted as ones (what strides reach), must fit.
  uint64_t reach = 1;
  for (const auto& dim : shape) {
    const auto size = unsigned_of(dim, "a dimension of \"" + name + "\"");
    reach = checked_multiply(
        reach,
        std::max<uint64_t>(size, 1),
        "the shape of tensor \"" + name + "\"");
    if (reach > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      throw FormatError(
          "the shape of tensor \"" + name +
          "\" is too large for int64 indexing");
    }
    info.shape.push_back(size);
  }
  const auto& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    throw FormatError(
        "the data_offsets of \"" + name + "\" must be [begin, end], got " +
        shown(offsets));
  }
  info.begin = unsigned_of(offsets[0], "the begin offset of \"" + name + "\"");
  info.end = unsigned_of(offsets[1], "the end offset of \"" + name + "\"");
  if (info.end < info.begin) {
    throw FormatError(
        "tensor \"" + name + "\" ends (" + std::to_string(info.end) +
        ") before it begins (" + std::to_string(info.begin) + ")");
  }
  const auto bytes = checked_multiply(
      element_count(info.shape, name),
      info_of(info.dtype).size,
      "the byte size of \"" + name + "\"");
  if (info.end - info.begin != bytes) {
    throw FormatError(
        "tensor \"" + name + "\" has " + std::to_string(info.end - info.begin) +
        " bytes between its offsets, but its dtype and shape need " +
        std::to_string(bytes));
  }
  return info;
}

/// How deep a header's JSON may nest (it needs 3 levels).
constexpr int kMaxJsonDepth = 8;

/// Parses the JSON text of a header, refusing duplicate keys in any object
/// and nesting deeper than `kMaxJsonDepth` (which would also make printing
/// a value for a message recurse without bound).
inline nlohmann::ordered_json parse_json(const char* begin, const char* end) {
  std::vector<std::unordered_set<std::string>> keys;
  std::string duplicate;
  const nlohmann::ordered_json::parser_callback_t callback =
      [&](int depth,
          nlohmann::ordered_json::parse_event_t event,
          nlohmann::ordered_json& parsed) {
        using Event = nlohmann::ordered_json::parse_event_t;
        if ((event == Event::object_start || event == Event::array_start) &&
            depth >= kMaxJsonDepth) {
          throw FormatError(
              "the header nests JSON deeper than " +
              std::to_string(kMaxJsonDepth) + " levels");
        }
        if (event == Event::object_start) {
          keys.emplace_back();
        } else if (event == Event::object_end && !keys.empty()) {
          keys.pop_back();
        } else if (event == Event::key && !keys.empty() && duplicate.empty()) {
          const auto key = parsed.get<std::string>();
          if (!keys.back().insert(key).second) {
            duplicate = key;
          }
        }
        return true;
      };
  nlohmann::ordered_json json;
  try {
    json = nlohmann::ordered_json::parse(begin, end, callback);
  } catch (const nlohmann::json::exception& error) {
    throw FormatError(
        std::string("the header is not valid JSON: ") + error.what());
  }
  if (!duplicate.empty()) {
    throw FormatError("the header names \"" + duplicate + "\" twice");
  }
  return json;
}

/// Parses and validates a whole file held in memory. Never reads outside
/// [data, data + size). Checks the header length, the JSON, every entry's
/// dtype, shape and offsets, that the tensors tile the data block exactly
/// (no overlap, no hole, nothing past the end), and that BOOL bytes are 0
/// or 1.
inline Header parse(const uint8_t* data, size_t size) {
  if (size < 8) {
    throw FormatError(
        "the file has " + std::to_string(size) +
        " bytes, fewer than the 8 of the header length");
  }
  const uint64_t header_bytes = read_u64_le(data);
  const uint64_t available = static_cast<uint64_t>(size) - 8;
  if (header_bytes > available) {
    throw FormatError(
        "the header length " + std::to_string(header_bytes) +
        " runs past the end of the file (" + std::to_string(available) +
        " bytes after the length)");
  }
  if (header_bytes > kMaxHeaderBytes) {
    throw FormatError(
        "the header length " + std::to_string(header_bytes) +
        " exceeds the limit of " + std::to_string(kMaxHeaderBytes) + " bytes");
  }
  if (header_bytes == 0 || data[8] != '{') {
    throw FormatError("the header must be a JSON object starting with '{'");
  }
  const auto* text = reinterpret_cast<const char*>(data + 8);
  const auto json = parse_json(text, text + header_bytes);
  if (!json.is_object()) {
    throw FormatError("the header must be a JSON object, got " + shown(json));
  }

  Header header;
  header.data_start = 8 + header_bytes;
  const uint64_t data_bytes = available - header_bytes;
  for (const auto& [key, value] : json.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) {
        throw FormatError(
            "__metadata__ must be an object, got " + shown(value));
      }
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) {
          throw FormatError(
              "metadata \"" + meta_key + "\" must be a string, got " +
              shown(meta_value));
        }
        header.metadata.emplace_back(meta_key, meta_value.get<std::string>());
      }
      continue;
    }
    header.tensors.push_back(parse_entry(key, value));
    if (header.tensors.back().end > data_bytes) {
      throw FormatError(
          "tensor \"" + key + "\" ends at byte " +
          std::to_string(header.tensors.back().end) + " of a data block of " +
          std::to_string(data_bytes) + " bytes");
    }
  }

  std::stable_sort(
      header.tensors.begin(),
      header.tensors.end(),
      [](const auto& a, const auto& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
      });
  uint64_t covered = 0;
  for (const auto& tensor : header.tensors) {
    if (tensor.begin < covered) {
      throw FormatError(
          "tensor \"" + tensor.name +
          "\" overlaps the tensor before it (it begins at " +
          std::to_string(tensor.begin) + ", before byte " +
          std::to_string(covered) + ")");
    }
    if (tensor.begin > covered) {
      throw FormatError(
          "bytes " + std::to_string(covered) + " to " +
          std::to_string(tensor.begin) +
          " of the data block belong to no tensor (a hole before \"" +
          tensor.name + "\")");
    }
    covered = tensor.end;
  }
  if (covered != data_bytes) {
    throw FormatError(
        "the data block has " + std::to_string(data_bytes) +
        " bytes but the tensors cover " + std::to_string(covered));
  }
  for (const auto& tensor : header.tensors) {
    if (tensor.dtype != DType::BOOL) {
      continue;
    }
    for (uint64_t i = tensor.begin; i < tensor.end; ++i) {
      const auto byte = data[header.data_start + i];
      if (byte > 1) {
        throw FormatError(
            "BOOL tensor \"" + tensor.name + "\" holds the byte " +
            std::to_string(byte) + "; only 0 and 1 are booleans");
      }
    }
  }
  return header;
}

/// The first `8 + N` bytes of a file holding `tensors` (whose offsets are
/// set here, in order) and `metadata`: the length, the JSON, and spaces so
/// that the data block starts at a multiple of 8.
inline std::string format_header(
    std::vector<TensorInfo>& tensors,
    const std::vector<std::pair<std::string, std::string>>& metadata) {
  nlohmann::ordered_json json = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    auto& meta = json["__metadata__"] = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) {
      meta[key] = value;
    }
  }
  uint64_t offset = 0;
  for (auto& tensor : tensors) {
    if (tensor.name == "__metadata__") {
      throw FormatError("a tensor cannot be named \"__metadata__\"");
    }
    if (json.contains(tensor.name)) {
      throw FormatError(
          "the tensor name \"" + tensor.name + "\" is used twice");
    }
    const auto bytes = checked_multiply(
        element_count(tensor.shape, tensor.name),
        info_of(tensor.dtype).size,
        "the byte size of \"" + tensor.name + "\"");
    tensor.begin = offset;
    tensor.end = offset + bytes;
    offset = tensor.end;
    json[tensor.name] = {
        {"dtype", info_of(tensor.dtype).name},
        {"shape", tensor.shape},
        {"data_offsets", {tensor.begin, tensor.end}}};
  }
  std::string text;
  try {
    text = json.dump();
  } catch (const nlohmann::json::exception& error) {
    throw FormatError(
        std::string("a tensor or metadata name is not valid UTF-8: ") +
        error.what());
  }
  text.append((8 - (text.size() % 8)) % 8, ' ');
  std::string header(8, '\0');
  write_u64_le(text.size(), header.data());
  return header + text;
}

} // namespace detail
} // namespace safetensors
} // namespace torchlora
