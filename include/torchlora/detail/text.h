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

/// Another torchlora error's text as a clause of a new message: without
/// its prefix, its closing " Nothing was changed." and its final period.
inline std::string as_clause(const std::string& message) {
  auto text = without_prefix(message);
  const std::string ending = TORCHLORA_NOTHING_CHANGED;
  if (text.size() >= ending.size() &&
      text.compare(text.size() - ending.size(), ending.size(), ending) == 0) {
    text.erase(text.size() - ending.size());
  }
  while (!text.empty() && (text.back() == '.' || text.back() == ' ')) {
    text.pop_back();
  }
  return text;
}

} // namespace detail
} // namespace torchlora
