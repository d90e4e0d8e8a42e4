#pragma once

// Small text helpers for torchlora's messages. Not part of the API.

#include <torchlora/detail/check.h>

#include <string>
#include <vector>

namespace torchlora {
namespace detail {

/// `"a", "b"` for {a, b}; `none` for an empty list.
inline std::string quoted_list(const std::vector<std::string>& names) {
  if (names.empty()) {
    return "none";
  }
  std::string text;
  for (const auto& name : names) {
    text += (text.empty() ? "\"" : ", \"") + name + "\"";
  }
  return text;
}

/// `message` without its "torchlora: " prefix.
inline std::string without_prefix(const std::string& message) {
  const std::string prefix = TORCHLORA_PREFIX;
  return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size())
                                       : message;
}

} // namespace detail
} // namespace torchlora
