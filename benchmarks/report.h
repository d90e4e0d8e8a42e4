#pragma once
// What the benchmark programs share: the cases, their names, a reporter that
// keeps each benchmark's median time, and the ratio report (table, JSON, SVG).

#include "run_context.h"

#include <torch/torch.h>

#include <benchmark/benchmark.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <iomanip>
#include <map>
#include <ostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace bench {

/// One shape on one device.
struct Case {
  torch::Device device;
  torch::Dtype dtype;
  int64_t rows;
  int64_t in;
  int64_t out;
  int64_t rank;
};

/// The variants, plain first: the others are measured against it.
/// `plain_again` is the plain layer timed a second time as a variant of its
/// own: its ratio (an A/A comparison) shows the run's noise floor.
/// `script_full_ft` and `script_lora` are the same Linear inside a
/// TorchScript module, fully trainable and with torchlora::jit's LoRA.
constexpr const char* kVariants[] = {
    "plain",
    "plain_again",
    "full_ft",
    "unfused",
    "torchlora",
    "merged",
    "dora",
    "dora_merged",
    "int8_lora",
    "nf4_lora",
    "script_full_ft",
    "script_lora"};

inline std::string device_name(const Case& c) {
  return c.device.is_cuda() ? "cuda" : "cpu";
}

inline std::string dtype_name(torch::Dtype dtype) {
  return dtype == torch::kBFloat16 ? "bf16"
      : dtype == torch::kFloat16   ? "f16"
                                   : "f32";
}

inline std::string case_name(const Case& c) {
  std::ostringstream name;
  name << device_name(c) << "/" << dtype_name(c.dtype) << "/" << c.rows << "x"
       << c.in << "x" << c.out << "/r" << c.rank;
  return name.str();
}

struct Key {
  Case c;
  std::string variant;
  bool backward;
};

/// Every registered benchmark, by name.
inline std::map<std::string, Key>& registry() {
  static std::map<std::string, Key> keys;
  return keys;
}

/// The benchmark's name; remembers what it measures.
inline std::string benchmark_name(
    const Case& c,
    const std::string& variant,
    bool backward) {
  const auto name =
      case_name(c) + "/" + variant + (backward ? "/fwdbwd" : "/fwd");
  registry().emplace(name, Key{c, variant, backward});
  return name;
}

/// A mixed batch: every row with its own adapter (`AdapterRouting`), or
/// the naive way, one forward per adapter's rows (`set_adapter`).
struct MixedKey {
  Case c;
  std::string variant; // "mixed" or "mixed_naive"
  int adapters; // K distinct adapters, rows spread evenly
  bool half_base; // every other row "__base__"
};

/// Every registered mixed-batch benchmark, by name.
inline std::map<std::string, MixedKey>& mixed_registry() {
  static std::map<std::string, MixedKey> keys;
  return keys;
}

/// The mixed benchmark's name; remembers what it measures.
inline std::string mixed_benchmark_name(const MixedKey& key) {
  const auto name = case_name(key.c) + "/" + key.variant + "/k" +
      std::to_string(key.adapters) + (key.half_base ? "/half_base" : "") +
      "/fwd";
  mixed_registry().emplace(name, key);
  return name;
}

/// True when `run` failed. Google Benchmark 1.7 (Debian 12) says so in
/// `error_occurred`; 1.8 replaced it with `skipped` (Debian 13 has 1.9).
template <typename R>
auto run_failed(const R& run, int) -> decltype(bool(run.error_occurred)) {
  return run.error_occurred;
}
template <typename R>
bool run_failed(const R& run, long) {
  return run.skipped != decltype(run.skipped){};
}

/// Prints as the console reporter does and keeps each benchmark's time in
/// milliseconds: the median of the repetitions, or the single run.
class CapturingReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& reports) override {
    benchmark::ConsoleReporter::ReportRuns(reports);
    for (const auto& run : reports) {
      if (run_failed(run, 0)) {
        continue;
      }
      const auto& name = run.run_name.function_name;
      const double ms =
          run.GetAdjustedRealTime() * to_milliseconds(run.time_unit);
      if (run.run_type == Run::RT_Aggregate) {
        if (run.aggregate_name == "median") {
          times_[name] = ms;
          medians_[name] = true;
        } else if (run.aggregate_name == "stddev") {
          stddevs_[name] = ms;
        }
      } else if (!medians_[name]) {
        times_[name] = ms;
      }
    }
  }

  const std::map<std::string, double>& times() const {
    return times_;
  }

  /// The standard deviation of the repetitions, where there were several.
  const std::map<std::string, double>& stddevs() const {
    return stddevs_;
  }

 private:
  static double to_milliseconds(benchmark::TimeUnit unit) {
    switch (unit) {
      case benchmark::kNanosecond:
        return 1e-6;
      case benchmark::kMicrosecond:
        return 1e-3;
      case benchmark::kMillisecond:
        return 1.0;
      case benchmark::kSecond:
        return 1e3;
    }
    return 1.0;
  }

  std::map<std::string, double> times_;
  std::map<std::string, double> stddevs_;
  std::map<std::string, bool> medians_;
};

/// A ratio timed in pairs: the median of the paired quotients, their spread
/// (interquartile range over median) and how many pairs were timed (0 when
/// the ratio is a quotient of medians).
struct PairedRatio {
  double ratio = 0;
  double spread = -1;
  int rounds = 0;
};

/// One row of the report: a variant of a case, both passes.
struct Row {
  Row(const Case& c, std::string variant) : c(c), variant(std::move(variant)) {}

  Case c;
  std::string variant;
  double fwd_ms = 0;
  double fwdbwd_ms = 0;
  double fwd_ratio = 0;
  double fwdbwd_ratio = 0;
  /// The spread of the repetitions: standard deviation over median (0 for
  /// a single run).
  double fwd_spread = 0;
  double fwdbwd_spread = 0;
  /// The paired timing behind the ratios (see PairedRatio).
  PairedRatio fwd_pair;
  PairedRatio fwdbwd_pair;
};

/// Rows with ratios against the plain Linear of the same case and run.
inline std::vector<Row> ratio_rows(
    const std::map<std::string, double>& times,
    const std::map<std::string, double>& stddevs = {}) {
  std::vector<Row> rows;
  std::map<std::string, size_t> index;
  for (const auto& [name, key] : registry()) {
    const auto found = times.find(name);
    if (found == times.end()) {
      continue;
    }
    const auto row_name = case_name(key.c) + "/" + key.variant;
    if (index.count(row_name) == 0) {
      index[row_name] = rows.size();
      rows.emplace_back(key.c, key.variant);
    }
    auto& row = rows[index[row_name]];
    (key.backward ? row.fwdbwd_ms : row.fwd_ms) = found->second;
    const auto stddev = stddevs.find(name);
    if (stddev != stddevs.end() && found->second > 0) {
      (key.backward ? row.fwdbwd_spread : row.fwd_spread) =
          stddev->second / found->second;
    }
  }
  for (auto& row : rows) {
    const auto plain = index.find(case_name(row.c) + "/plain");
    if (plain == index.end()) {
      continue;
    }
    const auto& reference = rows[plain->second];
    row.fwd_ratio = reference.fwd_ms > 0 ? row.fwd_ms / reference.fwd_ms : 0;
    row.fwdbwd_ratio =
        reference.fwdbwd_ms > 0 ? row.fwdbwd_ms / reference.fwdbwd_ms : 0;
  }
  auto order = [](const std::string& variant) {
    return std::find_if(
               std::begin(kVariants),
               std::end(kVariants),
               [&](const char* v) { return variant == v; }) -
        std::begin(kVariants);
  };
  std::stable_sort(rows.begin(), rows.end(), [&](const Row& a, const Row& b) {
    const auto ca = case_name(a.c);
    const auto cb = case_name(b.c);
    return ca != cb ? ca < cb : order(a.variant) < order(b.variant);
  });
  return rows;
}

/// A mixed-batch forward with its ratios: against the plain frozen Linear
/// and against one adapter over all rows (`torchlora`), same case and run.
struct MixedRow {
  MixedRow(MixedKey key, double fwd_ms) : key(std::move(key)), fwd_ms(fwd_ms) {}

  MixedKey key;
  double fwd_ms = 0;
  double fwd_ratio = 0;
  double fwd_ratio_to_single = 0;
  PairedRatio fwd_pair; // the paired timing against `torchlora`
};

inline std::vector<MixedRow> mixed_rows(
    const std::map<std::string, double>& times,
    const std::vector<Row>& rows) {
  std::vector<MixedRow> mixed;
  for (const auto& [name, key] : mixed_registry()) {
    const auto found = times.find(name);
    if (found == times.end()) {
      continue;
    }
    MixedRow row(key, found->second);
    for (const auto& reference : rows) {
      if (case_name(reference.c) != case_name(key.c) || reference.fwd_ms <= 0) {
        continue;
      }
      if (reference.variant == "plain") {
        row.fwd_ratio = row.fwd_ms / reference.fwd_ms;
      } else if (reference.variant == "torchlora") {
        row.fwd_ratio_to_single = row.fwd_ms / reference.fwd_ms;
      }
    }
    mixed.push_back(row);
  }
  std::stable_sort(
      mixed.begin(), mixed.end(), [](const MixedRow& a, const MixedRow& b) {
        const auto ca = case_name(a.key.c);
        const auto cb = case_name(b.key.c);
        if (ca != cb) {
          return ca < cb;
        }
        if (a.key.variant != b.key.variant) {
          return a.key.variant < b.key.variant;
        }
        if (a.key.half_base != b.key.half_base) {
          return b.key.half_base;
        }
        return a.key.adapters < b.key.adapters;
      });
  return mixed;
}

/// Training memory of one method (see memory_benchmark.h).
struct MemoryRow {
  std::string device;
  std::string method;
  int64_t parameter_bytes = 0;
  int64_t gradient_bytes = 0;
  int64_t optimizer_bytes = 0;
  int64_t peak_bytes = -1; // CUDA peak allocated; -1 where not measured
};

/// What merging for serving holds beyond the model's own tensors.
struct MergeMemoryRow {
  std::string method;
  int64_t parameter_bytes = 0;
  int64_t extra_bytes = 0; // heap in use after merge() minus before
};

inline std::string mebibytes(int64_t bytes) {
  std::ostringstream text;
  text << std::fixed << std::setprecision(bytes < (1 << 20) ? 3 : 1)
       << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return text.str();
}

/// Markdown tables of the mixed-batch rows and of merging's memory.
inline void print_serving_tables(
    const std::vector<MixedRow>& mixed,
    const std::vector<MergeMemoryRow>& merge_memory,
    std::ostream& out) {
  std::string current;
  for (const auto& row : mixed) {
    const auto name = case_name(row.key.c);
    if (name != current) {
      current = name;
      out << "\n"
          << name << ", mixed batches"
          << "\n\n| variant | adapters | base rows | forward ms | ratio to plain | ratio to one adapter |\n"
          << "|---|---:|---:|---:|---:|---:|\n";
    }
    out << std::fixed << "| " << row.key.variant << " | " << row.key.adapters
        << " | " << (row.key.half_base ? "half" : "none") << " | "
        << std::setprecision(3) << row.fwd_ms << " | " << std::setprecision(2)
        << row.fwd_ratio << "x | " << row.fwd_ratio_to_single << "x |\n";
  }
  if (!merge_memory.empty()) {
    out << "\nmerging for serving, 8 x Linear(1024, 1024), LoRA r=8, fp32\n\n"
        << "| method | parameters | held after merge beyond them |\n"
        << "|---|---:|---:|\n";
    for (const auto& m : merge_memory) {
      out << "| " << m.method << " | " << mebibytes(m.parameter_bytes) << " | "
          << mebibytes(m.extra_bytes) << " |\n";
    }
  }
}

/// Markdown tables of the rows and the memory measurements.
inline void print_tables(
    const std::vector<Row>& rows,
    const std::vector<MemoryRow>& memory,
    std::ostream& out) {
  std::string current;
  for (const auto& row : rows) {
    const auto name = case_name(row.c);
    if (name != current) {
      current = name;
      out << "\n"
          << name
          << "\n\n| variant | forward ms | ratio | forward + backward ms | ratio |\n"
          << "|---|---:|---:|---:|---:|\n";
    }
    out << std::fixed << "| " << row.variant << " | " << std::setprecision(3)
        << row.fwd_ms << " | " << std::setprecision(2) << row.fwd_ratio
        << "x | " << std::setprecision(3) << row.fwdbwd_ms << " | "
        << std::setprecision(2) << row.fwdbwd_ratio << "x |\n";
  }
  if (!memory.empty()) {
    out << "\ntraining memory, 8 x Linear(1024, 1024), Adam\n\n"
        << "| device | method | parameters | gradients | optimizer state | gradients + state | CUDA peak |\n"
        << "|---|---|---:|---:|---:|---:|---:|\n";
    for (const auto& m : memory) {
      out << "| " << m.device << " | " << m.method << " | "
          << mebibytes(m.parameter_bytes) << " | "
          << mebibytes(m.gradient_bytes) << " | "
          << mebibytes(m.optimizer_bytes) << " | "
          << mebibytes(m.gradient_bytes + m.optimizer_bytes) << " | "
          << (m.peak_bytes < 0 ? std::string("-") : mebibytes(m.peak_bytes))
          << " |\n";
    }
  }
}

/// A horizontal bar chart of every ratio, one group per case and pass.
inline void write_svg(const std::string& path, const std::vector<Row>& rows) {
  struct Bar {
    std::string label;
    double ratio;
    bool group_start;
  };
  std::vector<Bar> bars;
  for (const bool backward : {false, true}) {
    std::string current;
    for (const auto& row : rows) {
      if (row.variant == "plain") {
        continue;
      }
      const auto group = case_name(row.c) + (backward ? " fwd+bwd" : " fwd");
      const bool start = group != current;
      current = group;
      bars.push_back(
          {(start ? group + "  " : std::string()) + row.variant,
           backward ? row.fwdbwd_ratio : row.fwd_ratio,
           start});
    }
  }
  double max_ratio = 1.5;
  for (const auto& bar : bars) {
    max_ratio = std::max(max_ratio, bar.ratio);
  }
  const double left = 330, right = 780, top = 50, step = 18;
  const double height = top + step * static_cast<double>(bars.size()) + 50;
  auto sx = [&](double r) { return left + (right - left) * r / max_ratio; };
  std::ofstream svg(path);
  svg << std::fixed << std::setprecision(1)
      << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"820\" height=\""
      << height
      << "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"820\" height=\""
      << height
      << "\" fill=\"white\"/>\n<text x=\"410\" y=\"26\" text-anchor=\"middle\" font-size=\"15\">"
      << "time against a plain frozen Linear (1.00x), lower is better</text>\n";
  const std::map<std::string, std::string> colors = {
      {"plain_again", "#1f77b4"},
      {"full_ft", "#7f7f7f"},
      {"unfused", "#ff7f0e"},
      {"torchlora", "#d62728"},
      {"merged", "#2ca02c"},
      {"dora", "#e377c2"},
      {"dora_merged", "#17becf"},
      {"int8_lora", "#bcbd22"},
      {"nf4_lora", "#7f7f7f"},
      {"script_full_ft", "#8c564b"},
      {"script_lora", "#9467bd"}};
  for (size_t i = 0; i < bars.size(); ++i) {
    const double y = top + step * static_cast<double>(i);
    const auto& bar = bars[i];
    const auto variant = bar.label.substr(bar.label.rfind(' ') + 1);
    svg << "<text x=\"" << left - 6 << "\" y=\"" << y + 12
        << "\" text-anchor=\"end\""
        << (bar.group_start ? " font-weight=\"bold\"" : "") << ">" << bar.label
        << "</text>\n"
        << "<rect x=\"" << left << "\" y=\"" << y + 2 << "\" width=\""
        << sx(bar.ratio) - left << "\" height=\"" << step - 4 << "\" fill=\""
        << colors.at(variant) << "\"/>\n"
        << "<text x=\"" << sx(bar.ratio) + 4 << "\" y=\"" << y + 12 << "\">"
        << std::setprecision(2) << bar.ratio << "x</text>\n"
        << std::setprecision(1);
  }
  svg << "<line x1=\"" << sx(1.0) << "\" x2=\"" << sx(1.0) << "\" y1=\""
      << top - 4 << "\" y2=\"" << height - 40
      << "\" stroke=\"black\" stroke-dasharray=\"4 3\"/>\n<text x=\"" << sx(1.0)
      << "\" y=\"" << height - 24
      << "\" text-anchor=\"middle\">1.00x plain</text>\n</svg>\n";
}

/// Writes `<prefix>.json` (the run's context and the rows),
/// `<prefix>-memory.json` and `<prefix>.svg`.
inline void write_report(
    const std::string& prefix,
    const std::vector<Row>& rows,
    const std::vector<MemoryRow>& memory,
    const std::vector<MixedRow>& mixed,
    const std::vector<MergeMemoryRow>& merge_memory) {
  nlohmann::ordered_json list = nlohmann::ordered_json::array();
  for (const auto& row : rows) {
    list.push_back(
        {{"device", device_name(row.c)},
         {"dtype", dtype_name(row.c.dtype)},
         {"n", row.c.rows},
         {"d_in", row.c.in},
         {"d_out", row.c.out},
         {"rank", row.c.rank},
         {"variant", row.variant},
         {"fwd_ms", row.fwd_ms},
         {"fwdbwd_ms", row.fwdbwd_ms},
         {"fwd_ratio", row.fwd_ratio},
         {"fwdbwd_ratio", row.fwdbwd_ratio},
         {"fwd_spread", row.fwd_spread},
         {"fwdbwd_spread", row.fwdbwd_spread},
         {"fwd_pair_spread", row.fwd_pair.spread},
         {"fwdbwd_pair_spread", row.fwdbwd_pair.spread},
         {"fwd_pair_rounds", row.fwd_pair.rounds},
         {"fwdbwd_pair_rounds", row.fwdbwd_pair.rounds}});
  }
  for (const auto& row : mixed) {
    list.push_back(
        {{"device", device_name(row.key.c)},
         {"dtype", dtype_name(row.key.c.dtype)},
         {"n", row.key.c.rows},
         {"d_in", row.key.c.in},
         {"d_out", row.key.c.out},
         {"rank", row.key.c.rank},
         {"variant", row.key.variant},
         {"adapters", row.key.adapters},
         {"base_rows", row.key.half_base ? 0.5 : 0.0},
         {"fwd_ms", row.fwd_ms},
         {"fwd_ratio", row.fwd_ratio},
         {"fwd_ratio_to_single", row.fwd_ratio_to_single},
         {"fwd_pair_spread", row.fwd_pair.spread},
         {"fwd_pair_rounds", row.fwd_pair.rounds}});
  }
  const nlohmann::ordered_json report = {
      {"context", run_context()}, {"rows", list}};
  std::ofstream(prefix + ".json") << report.dump(2) << "\n";
  nlohmann::ordered_json memory_list = nlohmann::ordered_json::array();
  for (const auto& m : memory) {
    memory_list.push_back(
        {{"device", m.device},
         {"method", m.method},
         {"parameter_bytes", m.parameter_bytes},
         {"gradient_bytes", m.gradient_bytes},
         {"optimizer_bytes", m.optimizer_bytes},
         {"cuda_peak_bytes", m.peak_bytes}});
  }
  for (const auto& m : merge_memory) {
    memory_list.push_back(
        {{"device", "cpu"},
         {"method", m.method},
         {"parameter_bytes", m.parameter_bytes},
         {"merge_extra_bytes", m.extra_bytes}});
  }
  std::ofstream(prefix + "-memory.json") << memory_list.dump(2) << "\n";
  write_svg(prefix + ".svg", rows);
}

} // namespace bench
