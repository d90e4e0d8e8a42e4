#pragma once

// peft's adapter_config.json both ways: read into a LoRAConfig, every field
// checked for its JSON type and range, and written from what save_adapter
// saves. Not part of the API.

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
    TORCHLORA_CONFIG_CHECK(
        read,
        value == nullptr || !asks_for(*value),
        "the adapter uses peft's \"",
        feature,
        "\" (",
        shown_value(*value),
        "), which torchlora does not support");
  }
  if (const auto* init = read.find("init_lora_weights")) {
    TORCHLORA_CONFIG_CHECK(
        read,
        init->is_boolean() || init->is_string(),
        "\"init_lora_weights\" must be true, false or a string, got ",
        shown_value(*init));
    if (init->is_string()) {
      const auto name = init->get<std::string>();
      for (const char* changes_base : {"pissa", "olora", "corda", "loftq"}) {
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

// ---------------------------------------------------------------- writing

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
      {"init_lora_weights", true},
      {"layers_to_transform", layers_to_transform},
      {"layers_pattern", layers_pattern},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"use_dora", false}};
}

} // namespace detail
} // namespace torchlora
