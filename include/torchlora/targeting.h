#pragma once

#include <torchlora/config.h>
#include <torchlora/detail/check.h>
#include <torchlora/detail/text.h>
#include <torchlora/options.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <optional>
#include <regex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

/// Decides, from a `LoRAConfig`, which module paths get an adapter and with
/// which options. The rules are Python peft's (`check_target_module_exists`,
/// `get_pattern_key`); the constructor checks the config and compiles its
/// regexes, so a bad config fails before any model is touched.
///
/// Example:
/// ```
/// torchlora::TargetMatcher matcher(
///     torchlora::LoRAConfig(8).target_modules({"q_proj"}));
/// bool yes = matcher.is_target("blocks.0.attn.q_proj");  // true
/// ```
class TargetMatcher {
 public:
  explicit TargetMatcher(const LoRAConfig& config) : config_(config) {
    check_config();
    if (!config.target_regex().empty()) {
      target_regex_ = compile(config.target_regex(), "target_regex");
    }
    if (!config.exclude_regex().empty()) {
      exclude_regex_ = compile(config.exclude_regex(), "exclude_regex");
    }
    // The last `<name>.<n>.` of the path, as peft's `.*\.<name>\.(\d+)\.`
    // finds it: a greedy prefix. Unlike peft's, the prefix is optional, so
    // that a list at the top of the model (`blocks.0.fc`) has an index too.
    for (const auto& pattern : config.layers_pattern()) {
      compile(pattern, "layers_pattern"); // reports a bad pattern by itself
      layer_regexes_.push_back(compile(
          "(?:.*\\.)?(?:" + pattern + ")\\.(\\d+)\\..*", "layers_pattern"));
    }
    if (layer_regexes_.empty()) {
      layer_regexes_.push_back(std::regex("(?:.*\\.)?[^.]*\\.(\\d+)\\..*"));
    }
    for (const auto& entry : config.rank_pattern()) {
      rank_regexes_.push_back(compile_suffix(entry.first, "rank_pattern"));
    }
    for (const auto& entry : config.alpha_pattern()) {
      alpha_regexes_.push_back(compile_suffix(entry.first, "alpha_pattern"));
    }
  }

  /// True when `target_modules` is `{"all-linear"}` (any case): every
  /// Linear but output heads; `inject_lora` resolves it with the model.
  bool targets_all_linear() const {
    if (config_.target_modules().size() != 1) {
      return false;
    }
    auto name = config_.target_modules().front();
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) {
      return static_cast<char>(std::tolower(c));
    });
    return name == "all-linear";
  }

  /// True if the last segment of `path` is a usual output-head name
  /// ("lm_head", "head", "classifier", "score"), which `all-linear` leaves
  /// out as peft leaves out a model's output layer.
  static bool is_output_head(const std::string& path) {
    const auto dot = path.rfind('.');
    const auto last = dot == std::string::npos ? path : path.substr(dot + 1);
    return last == "lm_head" || last == "head" || last == "classifier" ||
        last == "score";
  }

  /// True if `path` is excluded by `exclude_modules`/`exclude_regex`, or lies
  /// in (or is) a module of `modules_to_save`.
  bool is_excluded(const std::string& path) const {
    if (matches_name(path, config_.exclude_modules())) {
      return true;
    }
    if (exclude_regex_ && std::regex_match(path, *exclude_regex_)) {
      return true;
    }
    // Inside a module to save: some dotted prefix of the path is one.
    for (size_t end = path.find('.'); end != std::string::npos;
         end = path.find('.', end + 1)) {
      if (is_named_to_save(path.substr(0, end), config_.modules_to_save())) {
        return true;
      }
    }
    return is_named_to_save(path, config_.modules_to_save());
  }

  /// True if the module at `path` is one the config names, exclusions and
  /// layer filter applied. With `all-linear` every path passes the name test:
  /// the caller keeps Linear layers only and leaves out the output head.
  bool is_target(const std::string& path) const {
    if (is_excluded(path)) {
      return false;
    }
    if (target_regex_) {
      return std::regex_match(path, *target_regex_);
    }
    const auto& names = config_.target_modules();
    if (!targets_all_linear()) {
      for (const auto& name : names) {
        if (path == name) {
          return true; // named exactly: no layer filter, as in peft
        }
      }
      if (!matches_name(path, names)) {
        return false;
      }
    }
    if (config_.layers_to_transform().empty()) {
      return true;
    }
    const auto index = layer_index(path);
    if (!index) {
      return false;
    }
    for (const auto wanted : config_.layers_to_transform()) {
      if (wanted == *index) {
        return true;
      }
    }
    return false;
  }

  /// The layer index of `path`: the number of the last `<name>.<n>.` in it,
  /// `<name>` being one of `layers_pattern` (tried in order) or, without
  /// them, any segment.
  std::optional<int64_t> layer_index(const std::string& path) const {
    std::smatch match;
    for (const auto& regex : layer_regexes_) {
      if (std::regex_match(path, match, regex)) {
        try {
          return std::stoll(match[1].str());
        } catch (const std::out_of_range&) {
          // Beyond int64: equal to no index anyone can list.
          return std::nullopt;
        }
      }
    }
    return std::nullopt;
  }

  /// True if `path` is a module of `modules_to_save` (trained in full).
  bool is_module_to_save(const std::string& path) const {
    return is_named_to_save(path, config_.modules_to_save());
  }

  /// peft's rule for `modules_to_save`: a module is one when its path ends
  /// with an entry, without a dot boundary ("head" also names "lm_head").
  static bool is_named_to_save(
      const std::string& path,
      const std::vector<std::string>& names) {
    for (const auto& name : names) {
      if (!path.empty() && !name.empty() && path.size() >= name.size() &&
          path.compare(path.size() - name.size(), name.size(), name) == 0) {
        return true;
      }
    }
    return false;
  }

  /// The adapter options for the module at `path`: the config's, with the
  /// first matching `rank_pattern` and `alpha_pattern` entries applied.
  LoRAOptions options_for(const std::string& path) const {
    LoRAOptions options = config_.lora_options();
    for (size_t i = 0; i < rank_regexes_.size(); ++i) {
      if (std::regex_match(path, rank_regexes_[i])) {
        options.rank(config_.rank_pattern()[i].second);
        break;
      }
    }
    for (size_t i = 0; i < alpha_regexes_.size(); ++i) {
      if (std::regex_match(path, alpha_regexes_[i])) {
        options.alpha(config_.alpha_pattern()[i].second);
        break;
      }
    }
    return options;
  }

  /// A short description of the targets, for messages.
  std::string describe_targets() const {
    if (!config_.target_regex().empty()) {
      return "target_regex \"" + config_.target_regex() + "\"";
    }
    return "target_modules {" + detail::quoted_list(config_.target_modules()) +
        "}";
  }

  const LoRAConfig& config() const {
    return config_;
  }

  /// True if `path` equals one of `names` or ends with "." + one of them.
  static bool matches_name(
      const std::string& path,
      const std::vector<std::string>& names) {
    for (const auto& name : names) {
      if (path == name ||
          (path.size() > name.size() &&
           path.compare(path.size() - name.size(), name.size(), name) == 0 &&
           path[path.size() - name.size() - 1] == '.')) {
        return true;
      }
    }
    return false;
  }

 private:
  static std::regex compile(const std::string& pattern, const char* what) {
    std::string problem;
    try {
      return std::regex(pattern, std::regex::ECMAScript);
    } catch (const std::regex_error& error) {
      problem = error.what();
    }
    TORCHLORA_CHECK(
        false,
        what,
        " is not a valid regex (ECMAScript syntax): \"",
        pattern,
        "\" (",
        problem,
        ")");
    return std::regex();
  }

  /// peft's `(.*\.)?(key)$`: the key matches the path or a dotted suffix.
  static std::regex compile_suffix(const std::string& key, const char* what) {
    compile(key, what); // reports a bad key by itself
    return compile("(?:.*\\.)?(?:" + key + ")", what);
  }

  void check_config() const {
    const auto& lora = config_.lora_options();
    detail::check_adapter_rank(lora.rank(), "LoRAConfig");
    detail::check_lora_options(lora);
    const auto& name = config_.adapter_name();
    TORCHLORA_CHECK(
        !name.empty() && name.find('.') == std::string::npos,
        "adapter_name must be non-empty and contain no '.', got \"",
        name,
        "\"");
    const bool has_list = !config_.target_modules().empty();
    const bool has_regex = !config_.target_regex().empty();
    TORCHLORA_CHECK(
        has_list || has_regex,
        "LoRAConfig names no targets: set target_modules({...}) or "
        "target_regex(\"...\"), got neither");
    TORCHLORA_CHECK(
        !(has_list && has_regex),
        "set target_modules or target_regex, not both; got "
        "target_regex \"",
        config_.target_regex(),
        "\" and ",
        config_.target_modules().size(),
        " target_modules");
    TORCHLORA_CHECK(
        config_.layers_to_transform().empty() || !has_regex,
        "layers_to_transform works with target_modules only, got "
        "target_regex \"",
        config_.target_regex(),
        "\"");
    TORCHLORA_CHECK(
        config_.layers_pattern().empty() ||
            !config_.layers_to_transform().empty(),
        "layers_pattern needs layers_to_transform, got layers_pattern \"",
        config_.layers_pattern().front(),
        "\" without it");
    for (const auto& [key, rank] : config_.rank_pattern()) {
      detail::check_adapter_rank(rank, "rank_pattern \"" + key + "\"");
    }
    for (const auto& [key, alpha] : config_.alpha_pattern()) {
      TORCHLORA_CHECK(
          std::isfinite(alpha) && alpha > 0,
          "alpha_pattern \"",
          key,
          "\" needs a finite alpha > 0, got ",
          alpha);
    }
  }

  LoRAConfig config_;
  std::optional<std::regex> target_regex_;
  std::optional<std::regex> exclude_regex_;
  std::vector<std::regex> layer_regexes_;
  std::vector<std::regex> rank_regexes_;
  std::vector<std::regex> alpha_regexes_;
};

} // namespace torchlora
