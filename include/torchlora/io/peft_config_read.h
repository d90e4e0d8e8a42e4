#pragma once

// peft's adapter_config.json read into a LoRAConfig (what load_adapter
// takes from it). Not part of the API.

#include <torchlora/config.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/read_file.h>
#include <torchlora/io/peft_config_reader.h>

#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace detail {

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
/// implement are refused by name, and every value is checked for its type
/// and range before it is used.
inline LoRAConfig config_from_json(
    const nlohmann::ordered_json& json,
    const std::string& adapter_name,
    const std::string& file) {
  const PeftConfigReader read(json, file);
  const auto* peft_type = read.find("peft_type");
  const auto type = peft_type == nullptr ? std::string("null")
      : peft_type->is_string()           ? peft_type->get<std::string>()
                                         : shown_value(*peft_type);
  TORCHLORA_CONFIG_CHECK(
      read,
      type == "LORA",
      "peft_type is ",
      type,
      "; torchlora loads LORA adapters only");
  for (const char* feature :
       {"fan_in_fan_out",
        "lora_bias",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
        "use_qalora",
        "megatron_config",
        "arrow_config"}) {
    const auto* value = read.find(feature);
    TORCHLORA_CONFIG_CHECK(
        read,
        value == nullptr || !asks_for(*value),
        "the adapter uses peft's \"",
        feature,
        "\" (",
        shown_value(*value),
        "), which torchlora does not support");
  }
  LoRAInit init_mode = LoRAInit::kaiming_uniform;
  int64_t pissa_niter = 0;
  if (const auto* init = read.find("init_lora_weights")) {
    TORCHLORA_CONFIG_CHECK(
        read,
        init->is_boolean() || init->is_string(),
        "\"init_lora_weights\" must be true, false or a string, got ",
        shown_value(*init));
    if (init->is_string()) {
      const auto name = init->get<std::string>();
      const std::string niter = "pissa_niter_";
      if (name == "pissa") {
        init_mode = LoRAInit::pissa;
      } else if (name == "olora") {
        init_mode = LoRAInit::olora;
      } else if (name == "gaussian") {
        init_mode = LoRAInit::gaussian;
      } else if (name.rfind(niter, 0) == 0) {
        const auto digits = name.substr(niter.size());
        TORCHLORA_CONFIG_CHECK(
            read,
            !digits.empty() && digits.size() <= 9 &&
                digits.find_first_not_of("0123456789") == std::string::npos,
            "\"init_lora_weights\" is \"",
            name,
            "\"; peft takes \"pissa_niter_<n>\" with n a number of iterations");
        init_mode = LoRAInit::pissa;
        pissa_niter = std::stoll(digits);
      }
      for (const char* changes_base : {"corda", "loftq"}) {
        TORCHLORA_CONFIG_CHECK(
            read,
            name.rfind(changes_base, 0) != 0,
            "the adapter was initialised with peft's \"",
            name,
            "\", which changes the base weights; torchlora does not support "
            "it");
      }
    }
  }

  // peft's defaults where a field is absent; a null r or lora_alpha is an
  // error (peft itself fails on it: scaling = lora_alpha / r).
  for (const char* key : {"r", "lora_alpha"}) {
    TORCHLORA_CONFIG_CHECK(
        read,
        !read.is_null(key),
        "\"",
        key,
        "\" must be ",
        std::string(key) == "r" ? "an integer" : "a number",
        " > 0, got null, which peft cannot load either");
  }
  const auto rank = read.integer("r").value_or(8);
  TORCHLORA_CONFIG_CHECK(read, rank > 0, "\"r\" must be > 0, got ", rank);
  const auto alpha = read.number("lora_alpha").value_or(8.0);
  TORCHLORA_CONFIG_CHECK(
      read,
      std::isfinite(alpha) && alpha > 0,
      "\"lora_alpha\" must be > 0, got ",
      alpha);
  const auto dropout = read.number("lora_dropout").value_or(0.0);
  TORCHLORA_CONFIG_CHECK(
      read,
      dropout >= 0 && dropout < 1,
      "\"lora_dropout\" must be in [0, 1), got ",
      dropout);
  LoRAConfig config(rank);
  config.alpha(alpha)
      .dropout(dropout)
      .use_rslora(read.boolean("use_rslora").value_or(false))
      .use_dora(read.boolean("use_dora").value_or(false))
      .init(init_mode)
      .pissa_niter(pissa_niter)
      .adapter_name(adapter_name);

  const auto* targets = read.find("target_modules");
  TORCHLORA_CONFIG_CHECK(
      read,
      targets != nullptr,
      "it has no target_modules (peft would pick them by model type; "
      "torchlora needs them written)");
  if (targets->is_string() && targets->get<std::string>() != "all-linear") {
    config.target_regex(targets->get<std::string>());
  } else {
    const auto list = read.string_list("target_modules");
    TORCHLORA_CONFIG_CHECK(
        read, !list.empty(), "\"target_modules\" is an empty list");
    config.target_modules(list);
  }
  const auto* excludes = read.find("exclude_modules");
  if (excludes != nullptr && excludes->is_string()) {
    config.exclude_regex(excludes->get<std::string>());
  } else {
    config.exclude_modules(read.string_list("exclude_modules"));
  }
  config.layers_to_transform(read.integer_list("layers_to_transform"));
  config.layers_pattern(read.string_list("layers_pattern"));

  LoRAConfig::RankPattern ranks;
  if (const auto* pattern = read.object("rank_pattern")) {
    for (const auto& [key, value] : pattern->items()) {
      const auto what = "rank_pattern \"" + key + "\"";
      const auto pattern_rank = read.integer_value(value, what);
      TORCHLORA_CONFIG_CHECK(
          read, pattern_rank > 0, what, " must be > 0, got ", pattern_rank);
      ranks.emplace_back(key, pattern_rank);
    }
  }
  config.rank_pattern(ranks);
  LoRAConfig::AlphaPattern alphas;
  if (const auto* pattern = read.object("alpha_pattern")) {
    for (const auto& [key, value] : pattern->items()) {
      const auto what = "alpha_pattern \"" + key + "\"";
      const auto pattern_alpha = read.number_value(value, what);
      TORCHLORA_CONFIG_CHECK(
          read,
          std::isfinite(pattern_alpha) && pattern_alpha > 0,
          what,
          " must be > 0, got ",
          pattern_alpha);
      alphas.emplace_back(key, pattern_alpha);
    }
  }
  config.alpha_pattern(alphas);
  config.modules_to_save(read.string_list("modules_to_save"));

  const auto bias = read.string("bias").value_or("none");
  TORCHLORA_CONFIG_CHECK(
      read,
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

/// The JSON document in the file at `path`, nested at most
/// `kMaxConfigDepth` levels (deeper documents are refused before anything
/// recurses over them).
inline nlohmann::ordered_json read_json_file(const std::string& path) {
  const auto bytes = read_regular_file(path, "JSON file");
  bool too_deep = false;
  const nlohmann::ordered_json::parser_callback_t limit_depth =
      [&](int depth, nlohmann::ordered_json::parse_event_t event, auto&) {
        using Event = nlohmann::ordered_json::parse_event_t;
        if ((event == Event::object_start || event == Event::array_start) &&
            depth >= kMaxConfigDepth) {
          too_deep = true;
          throw std::runtime_error("too deep");
        }
        return true;
      };
  try {
    return nlohmann::ordered_json::parse(
        bytes.data(), bytes.data() + bytes.size(), limit_depth);
  } catch (const std::exception& error) {
    TORCHLORA_CHECK(
        !too_deep,
        "'",
        path,
        "' nests JSON deeper than ",
        kMaxConfigDepth,
        " levels; no adapter config does");
    TORCHLORA_CHECK(false, "'", path, "' is not valid JSON: ", error.what());
  }
  return {};
}

/// The newest peft release whose files were checked against torchlora
/// (scripts/run-peft-interop.sh).
constexpr int kNewestCheckedPeftMinor = 20; // 0.20

/// Whether the file's MultiheadAttention out_proj deltas count twice: peft
/// (every release through 0.20, huggingface/peft#3774) adds an adapted
/// attention's out_proj delta twice in forward and in merges, so an adapter
/// it saved was trained and used that way. A file is taken as peft's when
/// its config has `peft_version` (peft 0.18 on) or `auto_mapping` (every
/// field of peft's config is written; torchlora writes it too, and halves
/// those B matrices so that peft doubles them back). A config without either
/// (torchlora before 0.5, or written by hand) counts the delta once. A
/// `peft_version` newer than the newest checked release is taken as
/// doubling too, with a warning.
inline bool out_proj_delta_counts_twice(
    const nlohmann::ordered_json& json,
    const std::string& file) {
  if (!json.is_object()) {
    return false;
  }
  const auto version = json.find("peft_version");
  if (version != json.end() && version->is_string()) {
    const auto text = version->get<std::string>();
    int major = 0;
    int minor = 0;
    if (std::sscanf(text.c_str(), "%d.%d", &major, &minor) == 2 &&
        (major > 0 || minor > kNewestCheckedPeftMinor)) {
      TORCHLORA_WARN(
          "load_adapter: '",
          file,
          "' was written by peft ",
          text,
          ", newer than the newest release torchlora was checked against "
          "(0.",
          kNewestCheckedPeftMinor,
          "); a MultiheadAttention's out_proj delta is taken to count twice, "
          "as in peft up to 0.",
          kNewestCheckedPeftMinor,
          " (huggingface/peft#3774)");
    }
    return true;
  }
  return json.contains("peft_version") || json.contains("auto_mapping");
}

/// What load_adapter takes from an adapter_config.json.
struct PeftFileConfig {
  LoRAConfig config;
  /// See `out_proj_delta_counts_twice`.
  bool out_proj_twice = false;
};

/// The `LoRAConfig` of the adapter_config.json at `path`.
inline PeftFileConfig read_peft_config(
    const std::string& path,
    const std::string& adapter_name) {
  const auto json = read_json_file(path);
  try {
    auto config = config_from_json(json, adapter_name, path);
    return {std::move(config), out_proj_delta_counts_twice(json, path)};
  } catch (const nlohmann::json::exception& error) {
    // Every field is checked before it is read; this is a safety net.
    TORCHLORA_CHECK(
        false,
        "adapter_config.json: unexpected content (",
        error.what(),
        ") (in '",
        path,
        "')");
  }
  return {LoRAConfig(1)};
}

} // namespace detail
} // namespace torchlora
