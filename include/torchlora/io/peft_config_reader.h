#pragma once

// Reading one adapter_config.json field by field: each field checked for
// its JSON type and range, every error naming the file and the field. Not
// part of the API.

#include <torchlora/config.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/read_file.h>

#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

/// `reader.fail(parts...)` unless `ok`: the message is built only on failure
/// (dumping a large or deep JSON value when nothing is wrong would cost
/// time, and stack).
#define TORCHLORA_CONFIG_CHECK(reader, ok, ...) \
  do {                                          \
    if (!(ok)) {                                \
      (reader).fail(__VA_ARGS__);               \
    }                                           \
  } while (false)

namespace torchlora {
namespace detail {

/// How deep adapter_config.json may nest (peft's configs nest 2 levels).
constexpr int kMaxConfigDepth = 32;

/// A JSON value for a message, cut to a readable length.
inline std::string shown_value(const nlohmann::ordered_json& value) {
  auto text = value.dump();
  return text.size() <= 80 ? text : text.substr(0, 77) + "...";
}

/// Reads the fields of one adapter_config.json; every error names the
/// field, the value found and the file. A field that is absent or null
/// takes peft's default (r and lora_alpha: absent only; null is an error).
class PeftConfigReader {
 public:
  PeftConfigReader(const nlohmann::ordered_json& json, std::string file)
      : json_(json), file_(std::move(file)) {
    TORCHLORA_CONFIG_CHECK(
        *this,
        json_.is_object(),
        "must hold a JSON object, got ",
        shown_value(json_));
  }

  /// True when `key` is present with the value null.
  bool is_null(const char* key) const {
    const auto found = json_.find(key);
    return found != json_.end() && found->is_null();
  }

  /// The value of `key`, or nullptr when it is absent or null.
  const nlohmann::ordered_json* find(const char* key) const {
    const auto found = json_.find(key);
    if (found == json_.end() || found->is_null()) {
      return nullptr;
    }
    return &*found;
  }

  std::optional<std::string> string(const char* key) const {
    const auto* value = find(key);
    if (value == nullptr) {
      return std::nullopt;
    }
    check_field(value->is_string(), key, "a string", *value);
    return value->get<std::string>();
  }

  std::optional<bool> boolean(const char* key) const {
    const auto* value = find(key);
    if (value == nullptr) {
      return std::nullopt;
    }
    check_field(value->is_boolean(), key, "true or false", *value);
    return value->get<bool>();
  }

  std::optional<double> number(const char* key) const {
    const auto* value = find(key);
    if (value == nullptr) {
      return std::nullopt;
    }
    check_field(value->is_number(), key, "a number", *value);
    return value->get<double>();
  }

  std::optional<int64_t> integer(const char* key) const {
    const auto* value = find(key);
    if (value == nullptr) {
      return std::nullopt;
    }
    return integer_value(*value, std::string("\"") + key + "\"");
  }

  /// A string, or a list of strings; empty when absent or null.
  std::vector<std::string> string_list(const char* key) const {
    std::vector<std::string> list;
    const auto* value = find(key);
    if (value == nullptr) {
      return list;
    }
    if (value->is_string()) {
      list.push_back(value->get<std::string>());
      return list;
    }
    check_field(
        value->is_array(), key, "a string or a list of strings", *value);
    for (const auto& item : *value) {
      check_field(item.is_string(), key, "a list of strings", *value);
      list.push_back(item.get<std::string>());
    }
    return list;
  }

  /// An integer, or a list of integers; empty when absent or null.
  std::vector<int64_t> integer_list(const char* key) const {
    std::vector<int64_t> list;
    const auto* value = find(key);
    if (value == nullptr) {
      return list;
    }
    const auto name = std::string("\"") + key + "\"";
    if (!value->is_array()) {
      list.push_back(integer_value(*value, name));
      return list;
    }
    for (const auto& item : *value) {
      list.push_back(integer_value(item, name + " entry"));
    }
    return list;
  }

  /// An object, or nullptr when absent or null; its values are read by the
  /// caller with `integer_value` or `number_value`.
  const nlohmann::ordered_json* object(const char* key) const {
    const auto* value = find(key);
    if (value != nullptr) {
      check_field(value->is_object(), key, "an object", *value);
    }
    return value;
  }

  /// `value` as an int64 integer; `what` names it in the error.
  int64_t integer_value(
      const nlohmann::ordered_json& value,
      const std::string& what) const {
    TORCHLORA_CONFIG_CHECK(
        *this,
        value.is_number_integer(),
        what,
        " must be an integer, got ",
        shown_value(value));
    TORCHLORA_CONFIG_CHECK(
        *this,
        !value.is_number_unsigned() ||
            value.get<uint64_t>() <=
                static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
        what,
        " must fit in a 64-bit integer, got ",
        shown_value(value));
    return value.get<int64_t>();
  }

  double number_value(
      const nlohmann::ordered_json& value,
      const std::string& what) const {
    TORCHLORA_CONFIG_CHECK(
        *this,
        value.is_number(),
        what,
        " must be a number, got ",
        shown_value(value));
    return value.get<double>();
  }

  /// Throws a `torchlora:` error made of `parts`, naming the file.
  template <typename... Parts>
  [[noreturn]] void fail(const Parts&... parts) const {
    throw c10::Error(
        {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
        c10::str(
            TORCHLORA_PREFIX "adapter_config.json: ",
            parts...,
            " (in '",
            file_,
            "')"));
  }

 private:
  void check_field(
      bool ok,
      const char* key,
      const char* expected,
      const nlohmann::ordered_json& value) const {
    TORCHLORA_CONFIG_CHECK(
        *this,
        ok,
        "\"",
        key,
        "\" must be ",
        expected,
        ", got ",
        shown_value(value));
  }

  const nlohmann::ordered_json& json_;
  std::string file_;
};

} // namespace detail
} // namespace torchlora
