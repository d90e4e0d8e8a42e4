#pragma once

// peft's adapter_config.json read into a LoRAConfig, every field checked
// for its JSON type and range. Not part of the API.

#include <torchlora/config.h>
#include <torchlora/detail/read_file.h>

#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace torchlora {
namespace detail {

/// Reads the fields of one adapter_config.json; every error names the
/// field, the value found and the file. A field that is absent or null
/// takes peft's default.
class PeftConfigReader {
 public:
  PeftConfigReader(const nlohmann::ordered_json& json, std::string file)
      : json_(json), file_(std::move(file)) {
    check(json_.is_object(), "must hold a JSON object, got ", json_.dump());
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

  /// An object (`{}` when absent or null); its values are read by the caller
  /// with `integer_value` or `number_value`.
  nlohmann::ordered_json object(const char* key) const {
    const auto* value = find(key);
    if (value == nullptr) {
      return nlohmann::ordered_json::object();
    }
    check_field(value->is_object(), key, "an object", *value);
    return *value;
  }

  /// `value` as an int64 integer; `what` names it in the error.
  int64_t integer_value(
      const nlohmann::ordered_json& value,
      const std::string& what) const {
    check(
        value.is_number_integer(),
        what,
        " must be an integer, got ",
        value.dump());
    check(
        !value.is_number_unsigned() ||
            value.get<uint64_t>() <=
                static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
        what,
        " must fit in a 64-bit integer, got ",
        value.dump());
    return value.get<int64_t>();
  }

  double number_value(
      const nlohmann::ordered_json& value,
      const std::string& what) const {
    check(value.is_number(), what, " must be a number, got ", value.dump());
    return value.get<double>();
  }

  /// A `torchlora:` error naming the file unless `ok`.
  template <typename... Parts>
  void check(bool ok, const Parts&... parts) const {
    TORCH_CHECK(
        ok,
        "torchlora: adapter_config.json: ",
        parts...,
        " (in '",
        file_,
        "')");
  }

 private:
  void check_field(
      bool ok,
      const char* key,
      const char* expected,
      const nlohmann::ordered_json& value) const {
    check(ok, "\"", key, "\" must be ", expected, ", got ", value.dump());
  }

  const nlohmann::ordered_json& json_;
  std::string file_;
};

/// True when `value` asks for a feature (not false, 0, or an empty string,
/// list or object).
inline bool asks_for(const nlohmann::ordered_json& value) {
  if (value.is_boolean()) {
    return value.get<bool>();
  }
  if (value.is_number()) {
    return value.get<double>() != 0;
  }
  if (value.is_string() || value.is_array() || value.is_object()) {
    return !value.empty();
  }
  return !value.is_null();
}

/// The `LoRAConfig` that the adapter_config.json `json` (read from `file`)
/// describes, as adapter `adapter_name`; peft features torchlora does not
/// implement are refused by name.
inline LoRAConfig config_from_json(
    const nlohmann::ordered_json& json,
    const std::string& adapter_name,
    const std::string& file) {
  const PeftConfigReader read(json, file);
  const auto* peft_type = read.find("peft_type");
  const auto type = peft_type == nullptr ? std::string("null")
      : peft_type->is_string()           ? peft_type->get<std::string>()
                                         : peft_type->dump();
  read.check(
      type == "LORA",
      "peft_type is ",
      type,
      "; torchlora loads LORA adapters only");
  for (const char* feature :
       {"use_dora",
        "fan_in_fan_out",
        "lora_bias",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "use_qalora",
        "megatron_config",
        "arrow_config"}) {
    const auto* value = read.find(feature);
    read.check(
        value == nullptr || !asks_for(*value),
        "the adapter uses peft's \"",
        feature,
        "\" (",
        value == nullptr ? std::string() : value->dump(),
        "), which torchlora does not support");
  }
  if (const auto* init = read.find("init_lora_weights")) {
    read.check(
        init->is_boolean() || init->is_string(),
        "\"init_lora_weights\" must be true, false or a string, got ",
        init->dump());
    if (init->is_string()) {
      const auto name = init->get<std::string>();
      for (const char* changes_base : {"pissa", "olora", "corda", "loftq"}) {
        read.check(
            name.rfind(changes_base, 0) != 0,
            "the adapter was initialised with peft's \"",
            name,
            "\", which changes the base weights; torchlora does not support "
            "it");
      }
    }
  }

  LoRAConfig config(read.integer("r").value_or(8));
  config.alpha(read.number("lora_alpha").value_or(8.0))
      .dropout(read.number("lora_dropout").value_or(0.0))
      .use_rslora(read.boolean("use_rslora").value_or(false))
      .adapter_name(adapter_name);

  const auto* targets = read.find("target_modules");
  read.check(
      targets != nullptr,
      "it has no target_modules (peft would pick them by model type; "
      "torchlora needs them written)");
  if (targets->is_string() && targets->get<std::string>() != "all-linear") {
    config.target_regex(targets->get<std::string>());
  } else {
    config.target_modules(read.string_list("target_modules"));
  }
  const auto* excludes = read.find("exclude_modules");
  if (excludes != nullptr && excludes->is_string()) {
    config.exclude_regex(excludes->get<std::string>());
  } else {
    config.exclude_modules(read.string_list("exclude_modules"));
  }
  config.layers_to_transform(read.integer_list("layers_to_transform"));
  config.layers_pattern(read.string_list("layers_pattern"));

  // Kept alive while iterating: items() refers into the object.
  const auto rank_json = read.object("rank_pattern");
  const auto alpha_json = read.object("alpha_pattern");
  LoRAConfig::RankPattern ranks;
  for (const auto& [key, value] : rank_json.items()) {
    ranks.emplace_back(
        key, read.integer_value(value, "rank_pattern \"" + key + "\""));
  }
  config.rank_pattern(ranks);
  LoRAConfig::AlphaPattern alphas;
  for (const auto& [key, value] : alpha_json.items()) {
    alphas.emplace_back(
        key, read.number_value(value, "alpha_pattern \"" + key + "\""));
  }
  config.alpha_pattern(alphas);
  config.modules_to_save(read.string_list("modules_to_save"));

  const auto bias = read.string("bias").value_or("none");
  read.check(
      bias == "none" || bias == "all" || bias == "lora_only",
      "\"bias\" must be \"none\", \"all\" or \"lora_only\", got \"",
      bias,
      "\"");
  config.bias(
      bias == "all"             ? LoRABias::all
          : bias == "lora_only" ? LoRABias::lora_only
                                : LoRABias::none);
  return config;
}

/// The JSON document in the file at `path`.
inline nlohmann::ordered_json read_json_file(const std::string& path) {
  const auto bytes = read_regular_file(path, "JSON file");
  try {
    return nlohmann::ordered_json::parse(bytes.begin(), bytes.end());
  } catch (const nlohmann::json::exception& error) {
    TORCH_CHECK(
        false, "torchlora: '", path, "' is not valid JSON: ", error.what());
  }
  return {};
}

/// The `LoRAConfig` of the adapter_config.json at `path`.
inline LoRAConfig read_peft_config(
    const std::string& path,
    const std::string& adapter_name) {
  const auto json = read_json_file(path);
  try {
    return config_from_json(json, adapter_name, path);
  } catch (const nlohmann::json::exception& error) {
    // Every field is checked before it is read; this is a safety net.
    TORCH_CHECK(
        false,
        "torchlora: adapter_config.json: unexpected content (",
        error.what(),
        ") (in '",
        path,
        "')");
  }
  return LoRAConfig(1);
}

} // namespace detail
} // namespace torchlora
