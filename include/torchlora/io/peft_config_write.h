#pragma once

// What save_adapter writes into peft's adapter_config.json. Not part of the
// API.

#include <torchlora/config.h>
#include <torchlora/detail/check.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

/// `text` with every regex special character escaped.
inline std::string regex_escape(const std::string& text) {
  std::string escaped;
  for (const char c : text) {
    if (std::strchr(".^$|()[]{}*+?\\", c) != nullptr) {
      escaped += '\\';
    }
    escaped += c;
  }
  return escaped;
}

/// The most frequent value of `values` (the first one on a tie).
template <typename T>
T most_common(const std::vector<T>& values) {
  T best = values.front();
  size_t best_count = 0;
  for (const auto& value : values) {
    const auto count =
        static_cast<size_t>(std::count(values.begin(), values.end(), value));
    if (count > best_count) {
      best = value;
      best_count = count;
    }
  }
  return best;
}

/// What `save_adapter` writes into adapter_config.json.
struct PeftConfigContents {
  std::string adapter_name;
  /// The adapted layers' paths and their adapter's options, in model order.
  std::vector<std::pair<std::string, LoRAOptions>> layers;
  /// False when a list of the paths would also match other layers (a list
  /// entry matches every path that ends with "." + entry): then the paths
  /// are written as one full-match regex.
  bool list_is_exact = true;
  /// As the caller gave them (peft matches them so too).
  std::vector<std::string> modules_to_save;
  LoRABias bias = LoRABias::none;
  std::string task_type;
  std::string base_model_name_or_path;
  /// The config the adapter was injected with, where it still selects
  /// exactly `layers` with their ranks and alphas: its targets and patterns
  /// are written as given, as peft writes its own.
  std::optional<LoRAConfig> as_configured;
};

/// True when `path`, written unescaped as a `rank_pattern` key, matches no
/// path of `paths` but itself under peft's rule (the key matches the path
/// or a dot-bounded suffix of it, as a regex).
inline bool is_unambiguous_pattern_key(
    const std::string& path,
    const std::vector<std::string>& paths) {
  for (const char c : path) {
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_' && c != '.') {
      return false;
    }
  }
  const std::regex key("(?:.*\\.)?(?:" + path + ")", std::regex::ECMAScript);
  for (const auto& other : paths) {
    if (other != path && std::regex_match(other, key)) {
      return false;
    }
  }
  return true;
}

/// A JSON list of `values`, or null when empty.
template <typename T>
nlohmann::ordered_json list_or_null(const std::vector<T>& values) {
  return values.empty() ? nlohmann::ordered_json()
                        : nlohmann::ordered_json(values);
}

/// peft's `init_lora_weights` for an adapter's init: true (Kaiming-uniform
/// A, zero B), "gaussian", false (both random), "pissa", "pissa_niter_<n>" or
/// "olora". peft re-runs PiSSA/OLoRA on the base when it loads such a file,
/// as `load_adapter` does.
inline nlohmann::ordered_json peft_init_name(const LoRAOptions& lora) {
  switch (lora.init()) {
    case LoRAInit::kaiming_uniform:
      return true;
    case LoRAInit::gaussian:
      return "gaussian";
    case LoRAInit::random:
      return false;
    case LoRAInit::pissa:
      return lora.pissa_niter() == 0
          ? std::string("pissa")
          : "pissa_niter_" + std::to_string(lora.pissa_niter());
    case LoRAInit::olora:
      return "olora";
  }
  return true;
}

/// peft's adapter_config.json for `contents`, its fields in peft's order.
/// With `as_configured`, that config's targets, ranks, alphas and patterns
/// as given. Otherwise the most common rank and alpha as `r` and
/// `lora_alpha`, the others in `rank_pattern` and `alpha_pattern` keyed by
/// their paths (escaped and anchored where a bare path would also match
/// another adapted layer). Layers that disagree on rsLoRA are an error
/// (peft holds one `use_rslora`); differing dropouts are a warning (peft
/// holds one `lora_dropout`, the first layer's is written).
inline nlohmann::ordered_json config_to_json(
    const PeftConfigContents& contents) {
  std::vector<int64_t> ranks;
  std::vector<double> alphas;
  std::vector<std::string> paths;
  for (const auto& [path, lora] : contents.layers) {
    ranks.push_back(lora.rank());
    alphas.push_back(lora.alpha());
    paths.push_back(path);
  }
  const auto& first = contents.layers.front().second;
  for (const auto& [path, lora] : contents.layers) {
    TORCHLORA_CHECK(
        lora.use_rslora() == first.use_rslora(),
        "save_adapter: some layers of adapter \"",
        contents.adapter_name,
        "\" use rsLoRA and some do not; peft's config holds one use_rslora");
  }
  for (const auto& [path, lora] : contents.layers) {
    TORCHLORA_CHECK(
        lora.use_dora() == first.use_dora(),
        "save_adapter: some layers of adapter \"",
        contents.adapter_name,
        "\" use DoRA and some do not; peft's config holds one use_dora");
    const auto changes_base = [](const LoRAOptions& options) {
      return options.init() == LoRAInit::pissa ||
          options.init() == LoRAInit::olora;
    };
    TORCHLORA_CHECK(
        (!changes_base(lora) && !changes_base(first)) ||
            peft_init_name(lora) == peft_init_name(first),
        "save_adapter: the layers of adapter \"",
        contents.adapter_name,
        "\" were initialized differently, from the base weight and not (",
        peft_init_name(lora).dump(),
        " and ",
        peft_init_name(first).dump(),
        "); peft's config holds one init_lora_weights");
  }
  for (const auto& [path, lora] : contents.layers) {
    if (lora.dropout() != first.dropout()) {
      TORCHLORA_WARN(
          "save_adapter: the layers' dropouts differ; peft's config "
          "holds one lora_dropout, written as ",
          first.dropout());
      break;
    }
  }
  auto rank = most_common(ranks);
  auto alpha = most_common(alphas);
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();
  nlohmann::ordered_json alpha_pattern = nlohmann::ordered_json::object();
  nlohmann::ordered_json targets;
  nlohmann::ordered_json excludes;
  nlohmann::ordered_json layers_to_transform;
  nlohmann::ordered_json layers_pattern;
  if (contents.as_configured) {
    const auto& config = *contents.as_configured;
    rank = config.rank();
    alpha = config.alpha();
    for (const auto& [key, value] : config.rank_pattern()) {
      rank_pattern[key] = value;
    }
    for (const auto& [key, value] : config.alpha_pattern()) {
      alpha_pattern[key] = value;
    }
    targets = config.target_regex().empty()
        ? nlohmann::ordered_json(config.target_modules())
        : nlohmann::ordered_json(config.target_regex());
    excludes = config.exclude_regex().empty()
        ? list_or_null(config.exclude_modules())
        : nlohmann::ordered_json(config.exclude_regex());
    layers_to_transform = list_or_null(config.layers_to_transform());
    layers_pattern = list_or_null(config.layers_pattern());
  } else {
    std::string targets_regex;
    for (size_t i = 0; i < paths.size(); ++i) {
      const auto& path = paths[i];
      targets_regex += (i ? "|" : "") + regex_escape(path);
      if (ranks[i] == rank && alphas[i] == alpha) {
        continue;
      }
      // peft matches a pattern key on the path or a dotted suffix of it: a
      // bare path that would also match another layer gets an anchor.
      const auto key = is_unambiguous_pattern_key(path, paths)
          ? path
          : "^" + regex_escape(path);
      if (ranks[i] != rank) {
        rank_pattern[key] = ranks[i];
      }
      if (alphas[i] != alpha) {
        alpha_pattern[key] = alphas[i];
      }
    }
    targets = contents.list_is_exact ? nlohmann::ordered_json(paths)
                                     : nlohmann::ordered_json(targets_regex);
  }
  auto null_if_empty = [](const std::string& text) {
    return text.empty() ? nlohmann::ordered_json()
                        : nlohmann::ordered_json(text);
  };
  return {
      {"task_type", null_if_empty(contents.task_type)},
      {"peft_type", "LORA"},
      // Written as peft writes it for a model that is not a transformers
      // one; its presence marks the file as following peft's conventions
      // (see out_proj_delta_counts_twice).
      {"auto_mapping", nullptr},
      {"base_model_name_or_path",
       null_if_empty(contents.base_model_name_or_path)},
      {"revision", nullptr},
      {"inference_mode", true},
      {"r", rank},
      {"target_modules", targets},
      {"exclude_modules", excludes},
      {"lora_alpha", alpha},
      {"lora_dropout", first.dropout()},
      {"fan_in_fan_out", false},
      {"bias", to_string(contents.bias)},
      {"use_rslora", first.use_rslora()},
      {"modules_to_save", list_or_null(contents.modules_to_save)},
      {"init_lora_weights", peft_init_name(first)},
      {"layers_to_transform", layers_to_transform},
      {"layers_pattern", layers_pattern},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"use_dora", first.use_dora()}};
}

} // namespace detail
} // namespace torchlora
