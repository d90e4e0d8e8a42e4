// The stateful random test: random sequences of the operations users run
// (inject, adapters, scales, merges, unloads, DisableAdapters, routings,
// AdaptedWeights scopes, backward passes, optimizer steps, train/eval,
// torch::save/load, adapter files, clones, dtype changes) on small models
// of every layer kind, each checked against a model of the library kept in
// float64: after every operation the model's output (and, after a
// backward, every adapter's gradient) must equal what plain LibTorch
// modules compute with the weights W + s B A the model state implies. An
// operation the state cannot honour must be refused with a torchlora:
// error that leaves the model unchanged; the model of the library says
// which. A failure is shrunk to the shortest sequence that still fails and
// printed.
//
// TORCHLORA_STATEFUL_SEQUENCES (default 300) sets how many sequences run,
// TORCHLORA_STATEFUL_SEED (default 1) the first seed.

#include "test_support.h"

#include <torchlora/torchlora.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

// A namespace per file: the test files are compiled together (a unity
// build), so that their helpers cannot clash.
namespace torchlora_stateful_test {

namespace {

namespace nn = torch::nn;
using namespace torchlora;

// ------------------------------------------------------------ model families

enum class Kind { linear, embedding, conv, attention };

/// An adaptable layer of a family, by its path in the model.
struct LayerSpec {
  LayerSpec(
      std::string path,
      Kind kind,
      bool bound = false,
      std::string companion = std::string())
      : path(std::move(path)),
        kind(kind),
        bound(bound),
        companion(std::move(companion)) {}

  std::string path;
  Kind kind;
  /// Read by a LibTorch module through its own member (AdaptedWeights).
  bool bound;
  /// For an attention: its out_proj, which inject_lora adapts with it.
  std::string companion;
};

/// A module whose reset() registers plain layers without typed members:
/// an Embedding, a Conv1d and a Linear, run through layer_forward. The
/// Conv1d has 16 out_channels: Debian 13's LibTorch 2.6 (oneDNN) returns a
/// wrong float32 input gradient from a plain convolution with another count
/// (see detail/conv_input_gradient.h; torchlora's own layers avoid it), and
/// this test is about torchlora, not LibTorch's plain layers.
struct TokenNetImpl : nn::Cloneable<TokenNetImpl> {
  TokenNetImpl() {
    reset();
  }
  void reset() override {
    register_module("emb", nn::Embedding(10, 6));
    register_module("conv", nn::Conv1d(nn::Conv1dOptions(6, 16, 3).padding(1)));
    register_module("head", nn::Linear(16, 4));
  }
  torch::Tensor forward(const torch::Tensor& tokens) {
    auto h = layer_forward(*named_children()["emb"], tokens); // [B, T, 6]
    h = layer_forward(*named_children()["conv"], h.transpose(1, 2)).tanh();
    return layer_forward(*named_children()["head"], h.transpose(1, 2));
  }
};
TORCH_MODULE(TokenNet);

struct Family {
  std::string name;
  std::vector<LayerSpec> layers;
  /// A plain model in float64, the same every time.
  std::function<std::shared_ptr<nn::Module>()> make;
  std::function<torch::Tensor(nn::Module&, const torch::Tensor&)> forward;
  torch::Tensor input;
  /// LibTorch dropout inside (outputs compared in eval mode only).
  bool dropout = false;
  /// Layers whose weights are one tensor (merges are refused).
  bool tied = false;
};

std::vector<Family> families() {
  std::vector<Family> all;
  {
    Family f;
    f.name = "mlp";
    f.layers = {{"0", Kind::linear}, {"2", Kind::linear}};
    f.make = [] {
      torch::manual_seed(101);
      nn::Sequential model(nn::Linear(6, 5), nn::Tanh(), nn::Linear(5, 4));
      model->to(torch::kFloat64);
      return std::static_pointer_cast<nn::Module>(model.ptr());
    };
    f.forward = [](nn::Module& m, const torch::Tensor& x) {
      return dynamic_cast<nn::SequentialImpl&>(m).forward(x);
    };
    torch::manual_seed(201);
    f.input = torch::randn({3, 6}, torch::kFloat64);
    all.push_back(f);
  }
  {
    Family f;
    f.name = "tokens";
    f.layers = {
        {"emb", Kind::embedding}, {"conv", Kind::conv}, {"head", Kind::linear}};
    f.make = [] {
      torch::manual_seed(102);
      TokenNet model;
      model->to(torch::kFloat64);
      return std::static_pointer_cast<nn::Module>(model.ptr());
    };
    f.forward = [](nn::Module& m, const torch::Tensor& x) {
      return dynamic_cast<TokenNetImpl&>(m).forward(x);
    };
    torch::manual_seed(202);
    f.input = torch::randint(0, 10, {3, 5}, torch::kLong);
    all.push_back(f);
  }
  {
    Family f;
    f.name = "conv2d";
    f.layers = {{"0", Kind::conv}, {"2", Kind::conv}};
    f.make = [] {
      torch::manual_seed(103);
      nn::Sequential model(
          nn::Conv2d(nn::Conv2dOptions(2, 3, 3).padding(1)),
          nn::Tanh(),
          nn::Conv2d(nn::Conv2dOptions(3, 2, 1)));
      model->to(torch::kFloat64);
      return std::static_pointer_cast<nn::Module>(model.ptr());
    };
    f.forward = [](nn::Module& m, const torch::Tensor& x) {
      return dynamic_cast<nn::SequentialImpl&>(m).forward(x);
    };
    torch::manual_seed(203);
    f.input = torch::randn({2, 2, 4, 4}, torch::kFloat64);
    all.push_back(f);
  }
  {
    Family f;
    f.name = "encoder";
    f.layers = {
        {"layers.0.self_attn",
         Kind::attention,
         true,
         "layers.0.self_attn.out_proj"},
        {"layers.0.self_attn.out_proj", Kind::linear, true},
        {"layers.0.linear1", Kind::linear, true},
        {"layers.0.linear2", Kind::linear, true}};
    f.make = [] {
      torch::manual_seed(104);
      nn::TransformerEncoder model(nn::TransformerEncoderOptions(
          nn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(12).dropout(
              0.2),
          1));
      model->to(torch::kFloat64);
      return std::static_pointer_cast<nn::Module>(model.ptr());
    };
    f.forward = [](nn::Module& m, const torch::Tensor& x) {
      return dynamic_cast<nn::TransformerEncoderImpl&>(m).forward(x);
    };
    torch::manual_seed(204);
    f.input = torch::randn({4, 3, 8}, torch::kFloat64);
    f.dropout = true;
    all.push_back(f);
  }
  {
    Family f;
    f.name = "tied";
    f.layers = {{"0", Kind::linear}, {"2", Kind::linear}};
    f.make = [] {
      torch::manual_seed(105);
      nn::Linear a(5, 5);
      nn::Linear b(5, 5);
      a->to(torch::kFloat64);
      b->to(torch::kFloat64);
      b->weight = a->weight; // one tensor, as tied embeddings are
      nn::Sequential model(a, nn::Tanh(), b);
      return std::static_pointer_cast<nn::Module>(model.ptr());
    };
    f.forward = [](nn::Module& m, const torch::Tensor& x) {
      return dynamic_cast<nn::SequentialImpl&>(m).forward(x);
    };
    torch::manual_seed(205);
    f.input = torch::randn({3, 5}, torch::kFloat64);
    f.tied = true;
    all.push_back(f);
  }
  return all;
}

bool is_bound(const Family& family) {
  return !family.layers.empty() && family.layers.front().bound;
}

/// The member a plain layer's forward reads its weight from.
torch::Tensor& weight_member(nn::Module& module, Kind kind) {
  if (kind == Kind::attention) {
    return module.as<nn::MultiheadAttentionImpl>()->in_proj_weight;
  }
  if (auto* linear = module.as<nn::LinearImpl>()) {
    return linear->weight;
  }
  if (auto* embedding = module.as<nn::EmbeddingImpl>()) {
    return embedding->weight;
  }
  if (auto* conv = module.as<nn::Conv1dImpl>()) {
    return conv->weight;
  }
  return module.as<nn::Conv2dImpl>()->weight;
}

/// The weight change `B A` in the weight's layout.
torch::Tensor delta_of(
    Kind kind,
    const torch::Tensor& W,
    const torch::Tensor& A,
    const torch::Tensor& B) {
  switch (kind) {
    case Kind::linear:
    case Kind::attention:
      return B.mm(A);
    case Kind::embedding:
      return B.mm(A).t();
    case Kind::conv:
      return B.flatten(1).mm(A.flatten(1)).view(W.sizes());
  }
  return torch::Tensor();
}

// ------------------------------------------------------------ the model

struct AdapterState {
  std::string name;
  int64_t rank = 1;
  double alpha = 1;
  bool rslora = false;
  double dropout = 0;
  double scale = 1;
  bool active = true;
  torch::Tensor A, B; // float64
  torch::Tensor grad_A, grad_B; // undefined: no gradient
  bool dora = false;
  torch::Tensor m, grad_m; // DoRA's magnitude, in peft's shape

  /// The adapter's trainable tensors: 'A', 'B' and DoRA's magnitude 'M'.
  std::vector<char> matrices() const {
    return dora ? std::vector<char>{'A', 'B', 'M'}
                : std::vector<char>{'A', 'B'};
  }
  torch::Tensor& value(char matrix) {
    return matrix == 'A' ? A : matrix == 'B' ? B : m;
  }
  const torch::Tensor& value(char matrix) const {
    return matrix == 'A' ? A : matrix == 'B' ? B : m;
  }
  torch::Tensor& grad(char matrix) {
    return matrix == 'A' ? grad_A : matrix == 'B' ? grad_B : grad_m;
  }

  double s() const {
    return (rslora ? alpha / std::sqrt(static_cast<double>(rank))
                   : alpha / static_cast<double>(rank)) *
        scale;
  }
};

struct LayerState {
  bool lora = false;
  /// Which LoRA layer object it is: a new one each time a plain layer is
  /// adapted (a guard made for an earlier one does not touch it).
  int generation = 0;
  bool enabled = true;
  int merged = 0; // 0: no, 1: keeping the original, 2: in place
  std::vector<AdapterState> adapters;
  /// An active adapter as merged: name, A, B, s, DoRA magnitude.
  using MergedAdapter = std::
      tuple<std::string, torch::Tensor, torch::Tensor, double, torch::Tensor>;
  /// The active adapters when merged.
  std::vector<MergedAdapter> merged_from;

  AdapterState* find(const std::string& name) {
    for (auto& adapter : adapters) {
      if (adapter.name == name) {
        return &adapter;
      }
    }
    return nullptr;
  }
  /// True when an adapter satisfies `test`.
  template <typename Test>
  bool any(const Test& test) const {
    return std::any_of(adapters.begin(), adapters.end(), test);
  }
  bool has_active() const {
    return any([](const AdapterState& a) { return a.active; });
  }
  std::vector<MergedAdapter> active_now() const {
    std::vector<MergedAdapter> now;
    for (const auto& adapter : adapters) {
      if (adapter.active) {
        now.emplace_back(
            adapter.name, adapter.A, adapter.B, adapter.s(), adapter.m);
      }
    }
    return now;
  }
  bool has_active_dora() const {
    return any([](const AdapterState& a) { return a.active && a.dora; });
  }
  bool has_dora() const {
    return any([](const AdapterState& a) { return a.dora; });
  }
  /// Merged, and the active adapters differ from what merge added.
  bool stale() const {
    if (merged == 0) {
      return false;
    }
    const auto now = active_now();
    if (now.size() != merged_from.size()) {
      return true;
    }
    for (size_t i = 0; i < now.size(); ++i) {
      const auto& [n1, A1, B1, s1, m1] = now[i];
      const auto& [n2, A2, B2, s2, m2] = merged_from[i];
      if (n1 != n2 || s1 != s2 || !torch::equal(A1, A2) ||
          !torch::equal(B1, B2) || m1.defined() != m2.defined() ||
          (m1.defined() && !torch::equal(m1, m2))) {
        return true;
      }
    }
    return false;
  }
};

/// One scope the test holds open: the library's object and what the model
/// of the library recorded when it was made.
struct Scope {
  enum Type { disable, routing, adapted } type;
  std::unique_ptr<DisableAdapters> disabled;
  std::unique_ptr<AdapterRouting> routed;
  std::unique_ptr<AdaptedWeights> adapted_weights;
  /// disable: each layer's generation, enabled flag and merge kind before.
  std::map<std::string, std::tuple<int, bool, int>> saved;
  /// routing: each row's adapter, and the LoRA layers it covers.
  std::vector<std::string> rows;
  std::set<std::string> covers;
  /// adapted: whether gradients were recorded, and the layers it held with
  /// the adapters they computed with.
  bool grad = true;
  std::map<std::string, LayerState> captured;
};

/// The float64 model of the library: per adapted layer, its adapters and
/// state; the plain reference model holds the base weights.
struct World {
  const Family* family = nullptr;
  std::shared_ptr<nn::Module> plain; // float64, no torchlora
  std::map<std::string, torch::Tensor> base; // each layer's base weight
  std::map<std::string, LayerState> layers;
  std::vector<Scope> scopes;
  bool training = true;
  bool ever_f32 = false;
  bool f32 = false;
  bool ever_injected = false;
  /// The Linear layers whose base weight is quantized, with how (the
  /// quantize operation's variant).
  std::map<std::string, int> quantized;

  bool any_scope(Scope::Type type) const {
    for (const auto& scope : scopes) {
      if (scope.type == type) {
        return true;
      }
    }
    return false;
  }
  const Scope* innermost(Scope::Type type) const {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
      if (it->type == type) {
        return &*it;
      }
    }
    return nullptr;
  }
  /// An AdaptedWeights scope holds some of this model's bound LoRA layers.
  bool held() const {
    if (!is_bound(*family)) {
      return false;
    }
    for (const auto& scope : scopes) {
      if (scope.type == Scope::adapted && !scope.captured.empty()) {
        return true;
      }
    }
    return false;
  }
  /// A routing covers some LoRA layer of the model.
  bool routed() const {
    for (const auto& scope : scopes) {
      if (scope.type == Scope::routing && !scope.covers.empty()) {
        return true;
      }
    }
    return false;
  }
  /// The innermost routing that covers layer `path`, or null.
  const Scope* router_of(const std::string& path) const {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
      if (it->type == Scope::routing && it->covers.count(path) > 0) {
        return &*it;
      }
    }
    return nullptr;
  }
  /// The innermost AdaptedWeights that holds layer `path`, or null.
  const Scope* holder_of(const std::string& path) const {
    for (auto it = scopes.rbegin(); it != scopes.rend(); ++it) {
      if (it->type == Scope::adapted && it->captured.count(path) > 0) {
        return &*it;
      }
    }
    return nullptr;
  }
  bool any_lora() const {
    for (const auto& [path, layer] : layers) {
      if (layer.lora) {
        return true;
      }
    }
    return false;
  }
  std::vector<std::string> adapter_names() const {
    std::vector<std::string> names;
    for (const auto& spec : family->layers) {
      for (const auto& adapter : layers.at(spec.path).adapters) {
        if (std::find(names.begin(), names.end(), adapter.name) ==
            names.end()) {
          names.push_back(adapter.name);
        }
      }
    }
    return names;
  }
};

torch::Tensor as_f32_values(const torch::Tensor& t) {
  return t.defined() ? t.to(torch::kFloat32).to(torch::kFloat64) : t;
}

/// What an adapter adds to the weight `W`: `s dW`, or for DoRA `g (W + s
/// dW) - W` with `g = m / ||W + s dW||` per output channel (the norm
/// detached; an Embedding's channels are its columns).
torch::Tensor contribution(
    Kind kind,
    const torch::Tensor& W,
    const torch::Tensor& A,
    const torch::Tensor& B,
    double s,
    const torch::Tensor& m) {
  const auto change = s * delta_of(kind, W, A, B);
  if (!m.defined()) {
    return change;
  }
  const auto full = W + change;
  const int64_t axis = kind == Kind::embedding ? 1 : 0;
  std::vector<int64_t> dims;
  for (int64_t d = 0; d < W.dim(); ++d) {
    if (d != axis) {
      dims.push_back(d);
    }
  }
  const auto norm = full.detach().pow(2).sum(dims, /*keepdim=*/true).sqrt();
  return m.reshape(norm.sizes()) / norm * full - W;
}

/// The weight layer `spec` computes with now, for a row routed to
/// `row_adapter` (empty: no routing).
torch::Tensor effective_weight(
    const World& world,
    const LayerSpec& spec,
    const LayerState& layer,
    const std::string* row_adapter,
    bool leaves) {
  const auto& W = world.base.at(spec.path);
  auto weight = W;
  if (!layer.lora) {
    return weight;
  }
  if (row_adapter != nullptr) {
    for (const auto& adapter : layer.adapters) {
      if (adapter.name == *row_adapter) {
        auto A = adapter.A, B = adapter.B, m = adapter.m;
        if (leaves && adapter.active) {
          A = adapter.grad_A;
          B = adapter.grad_B;
          m = adapter.grad_m;
        }
        weight = weight + contribution(spec.kind, W, A, B, adapter.s(), m);
      }
    }
    return weight;
  }
  if (!layer.enabled) {
    return weight;
  }
  if (layer.merged != 0) {
    for (const auto& [name, A, B, s, m] : layer.merged_from) {
      weight = weight + contribution(spec.kind, W, A, B, s, m);
    }
    return weight;
  }
  for (const auto& adapter : layer.adapters) {
    if (adapter.active) {
      const auto& A = leaves ? adapter.grad_A : adapter.A;
      const auto& B = leaves ? adapter.grad_B : adapter.B;
      const auto& m = leaves ? adapter.grad_m : adapter.m;
      weight = weight + contribution(spec.kind, W, A, B, adapter.s(), m);
    }
  }
  return weight;
}

// ------------------------------------------------------------ operations

struct Op {
  enum Type {
    inject,
    randomize,
    remove,
    activate,
    scale,
    merge,
    unmerge,
    merge_and_unload,
    unload,
    disable,
    route,
    adapted,
    pop,
    backward,
    step,
    mode,
    save_load,
    adapter_file,
    clone,
    to_dtype,
    quantize,
    dequantize,
  };
  Type type = inject;
  std::string name;
  std::vector<std::string> names; // routing rows, active adapters
  unsigned layer_mask = 1;
  int64_t rank = 1;
  double alpha = 1;
  bool rslora = false;
  bool dora = false;
  double dropout = 0;
  double value = 1; // scale, learning rate
  int variant = 0; // merge kind, optimizer, dtype, raw/version writes
  bool flag = true; // grad mode, train mode
  uint64_t seed = 0;
};

std::string describe(const Op& op) {
  std::ostringstream text;
  const auto list = [](const std::vector<std::string>& names) {
    std::string out;
    for (const auto& n : names) {
      out += (out.empty() ? "" : ",") + n;
    }
    return out;
  };
  switch (op.type) {
    case Op::inject:
      text << "inject_lora(\"" << op.name << "\", layers mask " << op.layer_mask
           << ", r=" << op.rank << ", alpha=" << op.alpha
           << (op.rslora ? ", rslora" : "") << (op.dora ? ", dora" : "")
           << ", dropout=" << op.dropout << ")";
      break;
    case Op::randomize:
      text << "randomize adapters " << (op.name.empty() ? "(all)" : op.name)
           << (op.variant ? " through .data()" : " with copy_") << " seed "
           << op.seed;
      break;
    case Op::remove:
      text << "delete_adapter(\"" << op.name << "\")";
      break;
    case Op::activate:
      text << "set_adapter({" << list(op.names) << "})";
      break;
    case Op::scale:
      text << "set_scale(\"" << op.name << "\", " << op.value << ")";
      break;
    case Op::merge:
      text << "merge(keep_original=" << (op.variant == 0) << ")";
      break;
    case Op::unmerge:
      text << "unmerge";
      break;
    case Op::merge_and_unload:
      text << "merge_and_unload";
      break;
    case Op::unload:
      text << "unload";
      break;
    case Op::disable:
      text << "open DisableAdapters";
      break;
    case Op::route:
      text << "open AdapterRouting({" << list(op.names) << "})";
      break;
    case Op::adapted:
      text << "open AdaptedWeights" << (op.flag ? "" : " under NoGradGuard");
      break;
    case Op::pop:
      text << "close the innermost scope";
      break;
    case Op::backward:
      text << "forward + backward, seed " << op.seed;
      break;
    case Op::step:
      text << "optimizer step: "
           << (op.variant == 0       ? "SGD"
                   : op.variant == 1 ? "Adam"
                   : op.variant == 2 ? "AdamW"
                                     : "raw .data() update")
           << " lr " << op.value << " seed " << op.seed;
      break;
    case Op::mode:
      text << (op.flag ? "train()" : "eval()");
      break;
    case Op::save_load:
      text << "torch::save then torch::load";
      break;
    case Op::adapter_file:
      text << "save_adapter, delete_adapter, load_adapter(\"" << op.name
           << "\")"
           << (op.variant ? " of the file made an older torchlora's (its "
                            "config without auto_mapping)"
                          : "");
      break;
    case Op::clone:
      text << "clone_keeping_trainable";
      break;
    case Op::to_dtype:
      text << "to(" << (op.variant ? "float32" : "float64") << ")";
      break;
    case Op::quantize:
      text << "quantize(layers mask " << op.layer_mask << ", "
           << (op.variant == 0       ? "int8"
                   : op.variant == 1 ? "nf4"
                                     : "nf4 double_quant")
           << ")";
      break;
    case Op::dequantize:
      text << "dequantize";
      break;
  }
  return text.str();
}

const std::vector<std::string> kNames = {"a", "b", "c"};

std::vector<Op> generate(const Family& family, std::mt19937_64& rng) {
  std::uniform_int_distribution<int> length(30, 100);
  const int count = length(rng);
  const auto pick = [&](int n) {
    return std::uniform_int_distribution<int>(0, n - 1)(rng);
  };
  const auto uniform = [&](double lo, double hi) {
    return std::uniform_real_distribution<double>(lo, hi)(rng);
  };
  const bool bound = is_bound(family);
  // Weights of the operations.
  std::vector<std::pair<Op::Type, int>> weights = {
      {Op::inject, 9},
      {Op::randomize, 8},
      {Op::remove, 3},
      {Op::activate, 5},
      {Op::scale, 4},
      {Op::merge, 6},
      {Op::unmerge, 5},
      {Op::merge_and_unload, 1},
      {Op::unload, 1},
      {Op::disable, 3},
      {Op::route, bound ? 1 : 4},
      {Op::adapted, bound ? 10 : 2},
      {Op::pop, 9},
      {Op::backward, 10},
      {Op::step, 8},
      {Op::mode, 4},
      {Op::save_load, 2},
      {Op::adapter_file, 2},
      {Op::clone, 2},
      {Op::to_dtype, 2},
      {Op::quantize, 5},
      {Op::dequantize, 1}};
  int total = 0;
  for (const auto& [type, weight] : weights) {
    total += weight;
  }
  std::vector<Op> ops;
  for (int i = 0; i < count; ++i) {
    int draw = pick(total);
    Op op;
    for (const auto& [type, weight] : weights) {
      if (draw < weight) {
        op.type = type;
        break;
      }
      draw -= weight;
    }
    op.name = kNames[pick(3)];
    op.seed = rng();
    op.layer_mask = 1 + pick((1 << family.layers.size()) - 1);
    op.rank = 1 + pick(3);
    op.alpha = std::round(uniform(0.5, 6) * 4) / 4;
    op.rslora = pick(4) == 0;
    op.dora = pick(3) == 0;
    op.dropout = pick(5) == 0 ? 0.3 : 0.0;
    op.flag = pick(3) != 0;
    switch (op.type) {
      case Op::randomize:
        op.name = pick(2) == 0 ? std::string() : op.name;
        op.variant = pick(2);
        break;
      case Op::activate: {
        op.names.clear();
        for (const auto& name : kNames) {
          if (pick(2) == 0) {
            op.names.push_back(name);
          }
        }
        if (op.names.empty()) {
          op.names.push_back(op.name);
        }
        break;
      }
      case Op::scale:
        op.value = std::round(uniform(-1, 2.5) * 8) / 8;
        break;
      case Op::merge:
        op.variant = pick(2);
        break;
      case Op::route: {
        const auto rows = family.input.size(0);
        for (int64_t row = 0; row < rows; ++row) {
          const int which = pick(4);
          op.names.push_back(
              which == 3 ? std::string("__base__") : kNames[which]);
        }
        break;
      }
      case Op::step:
        op.variant = pick(4);
        op.value = op.variant == 0 ? 0.2 : 0.05;
        break;
      case Op::to_dtype:
      case Op::adapter_file:
        op.variant = pick(2);
        break;
      case Op::quantize:
        op.variant = pick(3);
        break;
      default:
        break;
    }
    ops.push_back(op);
  }
  return ops;
}

// ------------------------------------------------------------ the runner

/// How often each operation ran or was refused, and how many outputs and
/// gradients were compared: the test's coverage, printed at its end.
std::map<std::string, int64_t>& tally() {
  static std::map<std::string, int64_t> counts;
  return counts;
}

std::string type_name(const Op& op) {
  const auto text = describe(op);
  return text.substr(0, text.find_first_of("( "));
}

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Runner {
 public:
  Runner(const Family& family, bool verbose)
      : family_(family), verbose_(verbose) {
    model_ = family.make();
    world_.family = &family;
    world_.plain = family.make();
    const auto modules = world_.plain->named_modules();
    for (const auto& spec : family.layers) {
      auto& module = *modules[spec.path];
      world_.base[spec.path] = weight_member(module, spec.kind);
      world_.layers[spec.path] = LayerState();
    }
    dir_ = std::filesystem::temp_directory_path() /
        ("torchlora_stateful_" + std::to_string(::getpid()));
    // A pretrained model: nothing trains until adapters are injected.
    for (auto& p : model_->parameters()) {
      p.set_requires_grad(false);
    }
    for (auto& p : world_.plain->parameters()) {
      p.set_requires_grad(false);
    }
  }

  ~Runner() {
    // Scopes end before the model: innermost first.
    while (!world_.scopes.empty()) {
      world_.scopes.pop_back();
    }
    std::error_code ignored;
    std::filesystem::remove_all(dir_, ignored);
  }

  /// Runs `ops`; throws Failure naming the operation that went wrong.
  void run(const std::vector<Op>& ops) {
    for (size_t i = 0; i < ops.size(); ++i) {
      index_ = i;
      try {
        apply(ops[i]);
        check_state();
        check_outputs();
      } catch (const Failure& failure) {
        throw Failure(
            "operation " + std::to_string(i + 1) + " (" + describe(ops[i]) +
            "): " + failure.what());
      }
      if (verbose_) {
        std::cout << "  " << i + 1 << ". " << describe(ops[i]) << ": "
                  << last_outcome_ << "\n";
      }
      ++tally()
          [type_name(ops[i]) + " " +
           last_outcome_.substr(0, last_outcome_.find_first_of(" ("))];
    }
  }

 private:
  // ---------------------------------------------------------- helpers

  [[noreturn]] void fail(const std::string& what) const {
    throw Failure(what);
  }

  /// Relative to the largest value compared: float64 throughout, or a
  /// model that has been float32 (whose gradients sum many rounded terms).
  double tolerance() const {
    return world_.ever_f32 ? 1e-3 : 1e-9;
  }

  void expect_close(
      const torch::Tensor& got,
      const torch::Tensor& want,
      const std::string& what,
      double scale = 1) const {
    if (got.sizes() != want.sizes()) {
      fail(
          what + ": shape " + c10::str(got.sizes()) + " against " +
          c10::str(want.sizes()));
    }
    const auto g = got.to(torch::kFloat64);
    const double size = 1 + want.abs().max().item<double>();
    const double diff = (g - want).abs().max().item<double>();
    if (!(diff <= tolerance() * scale * size)) {
      fail(
          what + ": differs from the float64 model by " + std::to_string(diff) +
          " (tolerance " + std::to_string(tolerance() * scale * size) +
          ", largest value " + std::to_string(size - 1) + ")");
    }
  }

  /// Runs `action`, which the model of the library says `must` succeed
  /// (1), be refused (0) or either (-1). A refusal must be a torchlora:
  /// error that leaves the model unchanged. Returns whether it ran.
  bool attempt(
      int must,
      const std::string& why,
      const std::function<void()>& action) {
    const auto before = torchlora_test::snapshot(*model_);
    try {
      action();
    } catch (const c10::Error& error) {
      const std::string message = error.what_without_backtrace();
      if (message.rfind("torchlora:", 0) != 0) {
        fail("failed with an error that is not torchlora's: " + message);
      }
      if (must == 1) {
        fail("refused, though the state allows it: " + message);
      }
      const auto after = torchlora_test::snapshot(*model_);
      if (after.size() != before.size()) {
        fail("refused, but the model's parameters changed: " + message);
      }
      for (const auto& [key, state] : before) {
        const auto found = after.find(key);
        if (found == after.end() ||
            !torchlora_test::same_values(state.values, found->second.values) ||
            state.requires_grad != found->second.requires_grad) {
          fail("refused, but '" + key + "' changed: " + message);
        }
      }
      last_outcome_ = "refused (" + message.substr(0, 90) + ")";
      return false;
    }
    if (must == 0) {
      fail("not refused, though " + why);
    }
    last_outcome_ = "done";
    return true;
  }

  std::vector<const LayerSpec*> chosen_layers(unsigned mask) const {
    std::vector<const LayerSpec*> layers;
    for (size_t i = 0; i < family_.layers.size(); ++i) {
      if (mask & (1u << i)) {
        layers.push_back(&family_.layers[i]);
      }
    }
    return layers;
  }

  /// The model's parameter for matrix `AB` of adapter `name` at `path`.
  torch::Tensor parameter(
      const LayerSpec& spec,
      const std::string& name,
      char matrix) const {
    const std::string prefix = matrix == 'M'
        ? "lora_magnitude_vector." + name + ".weight"
        : spec.kind == Kind::embedding
        ? std::string("lora_embedding_") + matrix + "." + name
        : std::string("lora_") + matrix + "." + name + ".weight";
    const auto params = model_->named_parameters();
    const auto* found = params.find(spec.path + "." + prefix);
    if (found == nullptr) {
      fail("the model has no parameter " + spec.path + "." + prefix);
    }
    return *found;
  }

  bool any_dropout_active() const {
    for (const auto& [path, layer] : world_.layers) {
      for (const auto& adapter : layer.adapters) {
        if (adapter.dropout > 0) {
          return true;
        }
      }
    }
    return false;
  }

  void clear_gradients() {
    for (auto& p : model_->parameters()) {
      p.mutable_grad() = torch::Tensor();
    }
    for (auto& [path, layer] : world_.layers) {
      for (auto& adapter : layer.adapters) {
        adapter.grad_A = torch::Tensor();
        adapter.grad_B = torch::Tensor();
        adapter.grad_m = torch::Tensor();
      }
    }
  }

  // ---------------------------------------------------------- predictions

  /// Why a forward must be refused now ("" if it must run).
  std::string forward_refusal() const {
    if (is_bound(family_)) {
      for (const auto& spec : family_.layers) {
        const auto& layer = world_.layers.at(spec.path);
        if (layer.lora && layer.merged == 0 &&
            world_.holder_of(spec.path) == nullptr) {
          return "a bound layer is used outside AdaptedWeights";
        }
      }
      return "";
    }
    for (const auto& spec : family_.layers) {
      const auto& layer = world_.layers.at(spec.path);
      if (!layer.lora) {
        continue;
      }
      if (world_.router_of(spec.path) != nullptr &&
          (layer.merged != 0 || !layer.enabled)) {
        return "a routed layer is merged or disabled";
      }
      if (world_.router_of(spec.path) != nullptr && layer.has_dora()) {
        return "a routed layer has a DoRA adapter";
      }
      if (layer.merged != 0 && layer.stale()) {
        return "a merged layer's adapters changed";
      }
    }
    return "";
  }

  // ---------------------------------------------------------- the reference

  /// The float64 model's output; with `leaves`, differentiable in the
  /// trainable adapters used (their grad_A/grad_B hold the leaves).
  torch::Tensor reference_output(bool leaves) {
    const auto modules = world_.plain->named_modules();
    const auto* routing = world_.innermost(Scope::routing);
    // Rows are computed one at a time only where a routing covers layers.
    const auto set_weights = [&](const int64_t* row_index) {
      for (const auto& spec : family_.layers) {
        const LayerState* layer = &world_.layers.at(spec.path);
        const std::string* row = nullptr;
        if (row_index != nullptr) {
          if (const auto* router = world_.router_of(spec.path)) {
            row = &router->rows[static_cast<size_t>(*row_index)];
          }
        }
        bool with_leaves = leaves;
        if (const auto* holder = world_.holder_of(spec.path)) {
          // The weights the innermost AdaptedWeights holding it computed.
          layer = &holder->captured.at(spec.path);
          with_leaves = leaves && holder->grad;
        }
        weight_member(*modules[spec.path], spec.kind) =
            effective_weight(world_, spec, *layer, row, with_leaves);
      }
    };
    torch::Tensor out;
    if (routing != nullptr && world_.routed()) {
      std::vector<torch::Tensor> rows;
      for (int64_t i = 0; i < family_.input.size(0); ++i) {
        set_weights(&i);
        rows.push_back(
            family_.forward(*world_.plain, family_.input.narrow(0, i, 1)));
      }
      out = torch::cat(rows, 0);
    } else {
      set_weights(nullptr);
      out = family_.forward(*world_.plain, family_.input);
    }
    for (const auto& spec : family_.layers) {
      weight_member(*modules[spec.path], spec.kind) = world_.base.at(spec.path);
    }
    return out;
  }

  /// Leaves for the adapters a backward trains: active ones of layers that
  /// are adapted, enabled and unmerged (or routed), in an AdaptedWeights
  /// that records gradients for bound layers.
  void make_leaves() {
    for (auto& [path, layer] : world_.layers) {
      for (auto& adapter : layer.adapters) {
        adapter.grad_A =
            adapter.A.detach().clone().set_requires_grad(adapter.active);
        adapter.grad_B =
            adapter.B.detach().clone().set_requires_grad(adapter.active);
        if (adapter.dora) {
          adapter.grad_m =
              adapter.m.detach().clone().set_requires_grad(adapter.active);
        }
      }
    }
    // An AdaptedWeights' weights are functions of the parameters: their
    // leaves are the world's, by name.
    for (auto& scope : world_.scopes) {
      for (auto& [path, held] : scope.captured) {
        for (auto& adapter : held.adapters) {
          if (auto* current = world_.layers.at(path).find(adapter.name)) {
            adapter.grad_A = current->grad_A;
            adapter.grad_B = current->grad_B;
            adapter.grad_m = current->grad_m;
          }
        }
      }
    }
  }

  // ---------------------------------------------------------- checks

  void check_state() const {
    const auto names = torchlora::adapter_names(*model_);
    if (names != world_.adapter_names()) {
      std::string got, want;
      for (const auto& n : names)
        got += n + " ";
      for (const auto& n : world_.adapter_names())
        want += n + " ";
      fail("adapter names [" + got + "] against the model's [" + want + "]");
    }
    const auto modules = model_->named_modules();
    for (const auto& spec : family_.layers) {
      const auto& layer = world_.layers.at(spec.path);
      const auto* found = modules.find(spec.path);
      if (found == nullptr) {
        fail("no module at " + spec.path);
      }
      auto* lora = dynamic_cast<LoRALayer*>(found->get());
      if ((lora != nullptr) != layer.lora) {
        fail(
            spec.path + (layer.lora ? " should be" : " should not be") +
            " a LoRA layer");
      }
      if (lora == nullptr) {
        continue;
      }
      if (lora->merged() != (layer.merged != 0) ||
          (layer.merged != 0 &&
           lora->merged_in_place() != (layer.merged == 2))) {
        fail(spec.path + ": merged state differs from the model's");
      }
      if (lora->adapters_enabled() != layer.enabled) {
        fail(spec.path + ": enabled state differs from the model's");
      }
      for (const auto& adapter : layer.adapters) {
        if (!lora->has_adapter(adapter.name)) {
          fail(spec.path + " lacks adapter " + adapter.name);
        }
        for (const char matrix : adapter.matrices()) {
          const auto p = parameter(spec, adapter.name, matrix);
          if (p.requires_grad() != adapter.active) {
            fail(
                spec.path + "." + adapter.name + "." + matrix +
                ": requires_grad " + (p.requires_grad() ? "true" : "false") +
                ", but the adapter is " + (adapter.active ? "" : "in") +
                "active");
          }
          expect_close(
              p.detach(),
              adapter.value(matrix),
              spec.path + " adapter " + adapter.name + " " + matrix);
        }
        if (lora->scale(adapter.name) != adapter.scale) {
          fail(spec.path + " scale of " + adapter.name);
        }
      }
      if (lora->adapter_names().size() != layer.adapters.size()) {
        fail(spec.path + ": adapter count");
      }
    }
    if (model_->is_training() != world_.training) {
      fail("training mode differs");
    }
  }

  /// Compares the model's output (in eval mode, without gradients) with the
  /// float64 model's, or expects the forward to be refused.
  void check_outputs() {
    const bool was_training = model_->is_training();
    model_->eval();
    torch::NoGradGuard no_grad;
    const auto refusal = forward_refusal();
    torch::Tensor got;
    try {
      got = family_.forward(*model_, family_.input.to(input_dtype()));
    } catch (const c10::Error& error) {
      model_->train(was_training);
      const std::string message = error.what_without_backtrace();
      if (refusal.empty()) {
        fail("the forward was refused: " + message);
      }
      if (message.rfind("torchlora:", 0) != 0) {
        fail(
            "the forward failed with an error that is not torchlora's: " +
            message);
      }
      ++tally()["~ forwards refused as predicted"];
      return;
    }
    model_->train(was_training);
    if (!refusal.empty()) {
      fail("the forward ran, though " + refusal);
    }
    const bool plain_training = world_.plain->is_training();
    world_.plain->eval();
    const auto want = reference_output(false);
    world_.plain->train(plain_training);
    expect_close(got, want, "output");
    ++tally()["~ outputs compared"];
  }

  torch::Dtype input_dtype() const {
    if (!family_.input.is_floating_point()) {
      return family_.input.scalar_type();
    }
    return world_.f32 ? torch::kFloat32 : torch::kFloat64;
  }

  // ---------------------------------------------------------- operations

  void apply(const Op& op) {
    last_outcome_ = "";
    switch (op.type) {
      case Op::inject:
        return do_inject(op);
      case Op::randomize:
        return do_randomize(op);
      case Op::remove:
        return do_remove(op);
      case Op::activate:
        return do_activate(op);
      case Op::scale:
        return do_scale(op);
      case Op::merge:
        return do_merge(op.variant == 0);
      case Op::unmerge:
        return do_unmerge();
      case Op::merge_and_unload:
        return do_unload(true);
      case Op::unload:
        return do_unload(false);
      case Op::disable:
        return do_disable();
      case Op::route:
        return do_route(op);
      case Op::adapted:
        return do_adapted(op);
      case Op::pop:
        return do_pop();
      case Op::backward:
        return do_backward(op);
      case Op::step:
        return do_step(op);
      case Op::mode:
        model_->train(op.flag);
        world_.training = op.flag;
        world_.plain->train(op.flag);
        last_outcome_ = "done";
        return;
      case Op::save_load:
        return do_save_load();
      case Op::adapter_file:
        return do_adapter_file(op);
      case Op::clone:
        return do_clone();
      case Op::to_dtype:
        return do_to(op.variant == 1);
      case Op::quantize:
        return do_quantize(op);
      case Op::dequantize:
        return do_dequantize();
    }
  }

  /// The layers `inject_lora` adapts for `targets`: each, and an attention's
  /// out_proj unless it has the adapter already.
  std::vector<const LayerSpec*> injected_layers(
      const std::vector<const LayerSpec*>& targets,
      const std::string& name) const {
    std::vector<const LayerSpec*> layers = targets;
    for (const auto* spec : targets) {
      if (spec->companion.empty()) {
        continue;
      }
      for (const auto& other : family_.layers) {
        if (other.path == spec->companion &&
            std::find(layers.begin(), layers.end(), &other) == layers.end() &&
            const_cast<World&>(world_).layers.at(other.path).find(name) ==
                nullptr) {
          layers.push_back(&other);
        }
      }
    }
    return layers;
  }

  void do_inject(const Op& op) {
    const auto targets = chosen_layers(op.layer_mask);
    const auto layers = injected_layers(targets, op.name);
    std::string why;
    if (world_.routed()) {
      why = "an AdapterRouting lives";
    } else if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    for (const auto* spec : layers) {
      const auto& layer = world_.layers.at(spec->path);
      if (layer.lora && layer.merged != 0) {
        why = "a targeted layer is merged";
      }
      if (layer.lora && !layer.enabled) {
        why = "a targeted layer is disabled";
      }
      if (spec->bound && op.dropout > 0) {
        why = "a bound layer needs dropout 0";
      }
    }
    for (const auto* spec : targets) {
      if (const_cast<World&>(world_).layers.at(spec->path).find(op.name)) {
        why = "a targeted layer has the adapter";
      }
    }
    for (const auto& [path, layer] : world_.layers) {
      if (layer.lora && !layer.enabled) {
        why = "the adapters are disabled";
      }
    }
    std::vector<std::string> paths;
    for (const auto* spec : targets) {
      paths.push_back(spec->path);
    }
    for (const auto* spec : layers) {
      if (op.dora && spec->kind == Kind::attention) {
        why = "MultiheadAttention takes no DoRA";
      }
      if (op.dora && world_.quantized.count(spec->path) > 0) {
        why = "DoRA over a quantized base";
      }
    }
    const auto config = LoRAConfig(op.rank)
                            .alpha(op.alpha)
                            .use_rslora(op.rslora)
                            .use_dora(op.dora)
                            .dropout(op.dropout)
                            .adapter_name(op.name)
                            .target_modules(paths);
    if (!attempt(
            why.empty() ? 1 : 0, why, [&] { inject_lora(*model_, config); })) {
      return;
    }
    world_.ever_injected = true;
    for (const auto* spec : layers) {
      auto& layer = world_.layers.at(spec->path);
      if (!layer.lora) {
        layer.generation = ++generations_;
      }
      layer.lora = true;
      AdapterState adapter;
      adapter.name = op.name;
      adapter.rank = op.rank;
      adapter.alpha = op.alpha;
      adapter.rslora = op.rslora;
      adapter.dropout = op.dropout;
      adapter.A =
          parameter(*spec, op.name, 'A').detach().to(torch::kFloat64).clone();
      adapter.B =
          parameter(*spec, op.name, 'B').detach().to(torch::kFloat64).clone();
      adapter.dora = op.dora;
      if (op.dora) {
        adapter.m =
            parameter(*spec, op.name, 'M').detach().to(torch::kFloat64).clone();
        // A fresh magnitude is the base weight's norm per output channel
        // (an Embedding's columns).
        const auto& W = world_.base.at(spec->path);
        const int64_t axis = spec->kind == Kind::embedding ? 1 : 0;
        const auto norms =
            W.transpose(0, axis).reshape({W.size(axis), -1}).norm(2, {1});
        expect_close(
            adapter.m.reshape(-1), norms, spec->path + ": a fresh magnitude");
      }
      // A fresh adapter changes nothing: B is zero (A for an Embedding, as
      // in peft).
      const auto& zero = spec->kind == Kind::embedding ? adapter.A : adapter.B;
      if (!torch::equal(zero, torch::zeros_like(zero))) {
        fail(spec->path + ": a fresh adapter's delta is not zero");
      }
      layer.adapters.push_back(adapter);
    }
  }

  void do_randomize(const Op& op) {
    torch::manual_seed(static_cast<uint64_t>(op.seed % 1000003));
    for (const auto& spec : family_.layers) {
      auto& layer = world_.layers.at(spec.path);
      for (auto& adapter : layer.adapters) {
        if (!op.name.empty() && adapter.name != op.name) {
          continue;
        }
        for (const char matrix : adapter.matrices()) {
          auto p = parameter(spec, adapter.name, matrix);
          // Magnitudes stay positive, near the weights' norms.
          auto values = matrix == 'M'
              ? adapter.m * (torch::rand(p.sizes(), torch::kFloat64) + 0.5)
              : torch::randn(p.sizes(), torch::kFloat64) * 0.4;
          if (world_.f32) {
            values = as_f32_values(values);
          }
          torch::NoGradGuard no_grad;
          if (op.variant == 1) {
            p.data().copy_(values); // as LibTorch 1.13's SGD writes
          } else {
            p.copy_(values);
          }
          adapter.value(matrix) = values;
        }
      }
    }
    last_outcome_ = "done";
  }

  /// Why an operation on adapter `name` must be refused ("" if it must
  /// run): no layer has it, a layer with it is merged, an AdaptedWeights
  /// holds the layers, or (when it `removes` the adapter) a routing lives.
  std::string adapter_refusal(const std::string& name, bool removes) {
    const auto names = world_.adapter_names();
    std::string why;
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      why = "no layer has the adapter";
    } else if (removes && world_.routed()) {
      why = "an AdapterRouting lives";
    } else if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    for (auto& [path, layer] : world_.layers) {
      if (layer.find(name) != nullptr && layer.merged != 0) {
        why = "a layer with the adapter is merged";
      }
    }
    return why;
  }

  void do_remove(const Op& op) {
    const auto why = adapter_refusal(op.name, /*removes=*/true);
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          delete_adapter(*model_, op.name);
        })) {
      return;
    }
    for (auto& [path, layer] : world_.layers) {
      remove_adapter(layer, op.name);
    }
  }

  static void remove_adapter(LayerState& layer, const std::string& name) {
    for (size_t i = 0; i < layer.adapters.size(); ++i) {
      if (layer.adapters[i].name == name) {
        const bool was_active = layer.adapters[i].active;
        layer.adapters.erase(
            layer.adapters.begin() + static_cast<std::ptrdiff_t>(i));
        if (was_active && !layer.adapters.empty() && !layer.has_active()) {
          layer.adapters.front().active = true;
        }
        return;
      }
    }
  }

  void do_activate(const Op& op) {
    const auto names = world_.adapter_names();
    std::string why;
    for (const auto& name : op.names) {
      if (std::find(names.begin(), names.end(), name) == names.end()) {
        why = "an adapter named does not exist";
      }
    }
    for (const auto& [path, layer] : world_.layers) {
      if (layer.lora && layer.merged != 0) {
        why = "a layer is merged";
      }
    }
    if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          set_adapter(*model_, op.names);
        })) {
      return;
    }
    for (auto& [path, layer] : world_.layers) {
      for (auto& adapter : layer.adapters) {
        adapter.active =
            std::find(op.names.begin(), op.names.end(), adapter.name) !=
            op.names.end();
      }
    }
  }

  void do_scale(const Op& op) {
    const auto why = adapter_refusal(op.name, /*removes=*/false);
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          set_scale(*model_, op.name, op.value);
        })) {
      return;
    }
    for (auto& [path, layer] : world_.layers) {
      if (auto* adapter = layer.find(op.name)) {
        adapter->scale = op.value;
      }
    }
  }

  /// Why merging the model (or merge_and_unload) must be refused now.
  std::string merge_refusal(bool in_place, bool unload) const {
    if (world_.held()) {
      return "an AdaptedWeights lives";
    }
    if (unload && world_.routed()) {
      return "an AdapterRouting lives";
    }
    for (const auto& [path, layer] : world_.layers) {
      if (!layer.lora) {
        continue;
      }
      if (layer.merged == 0 && layer.has_active() && !layer.enabled) {
        return "a layer to merge is disabled";
      }
      if (layer.merged != 0 && layer.stale()) {
        return "a merged layer's adapters changed";
      }
      if (family_.tied && layer.merged == 0 && layer.has_active()) {
        return "the layer's weight is tied";
      }
      if (in_place && layer.merged == 0 && layer.has_active_dora()) {
        return "merge_in_place with an active DoRA adapter";
      }
      if (!unload && layer.merged == 0 && layer.has_active() &&
          world_.quantized.count(path) > 0) {
        return "merging into a quantized base weight";
      }
    }
    return "";
  }

  void do_merge(bool keep_original) {
    const auto why = merge_refusal(!keep_original, false);
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          merge(*model_, MergeOptions().keep_original(keep_original));
        })) {
      return;
    }
    for (auto& [path, layer] : world_.layers) {
      if (layer.lora && layer.merged == 0 && layer.has_active()) {
        layer.merged = keep_original ? 1 : 2;
        layer.merged_from = layer.active_now();
      }
    }
  }

  void do_unmerge() {
    const std::string why = world_.held() ? "an AdaptedWeights lives" : "";
    if (!attempt(why.empty() ? 1 : 0, why, [&] { unmerge(*model_); })) {
      return;
    }
    for (auto& [path, layer] : world_.layers) {
      layer.merged = 0;
      layer.merged_from.clear();
    }
  }

  void do_unload(bool merge_first) {
    std::string why;
    if (merge_first) {
      why = merge_refusal(false, true);
    } else if (world_.routed()) {
      why = "an AdapterRouting lives";
    } else if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          if (merge_first) {
            merge_and_unload(*model_);
          } else {
            unload(*model_);
          }
        })) {
      return;
    }
    torch::NoGradGuard no_grad;
    for (const auto& spec : family_.layers) {
      auto& layer = world_.layers.at(spec.path);
      if (!layer.lora) {
        continue;
      }
      if (merge_first) {
        const auto merged =
            effective_weight(world_, spec, layer, nullptr, false);
        world_.base.at(spec.path).copy_(
            world_.f32 ? as_f32_values(merged) : merged);
      }
      layer = LayerState();
    }
    if (merge_first) {
      // Quantized layers become float Linear layers, adapted or not.
      world_.quantized.clear();
    }
  }

  /// The float64 weight the codes and scales of the quantized layer at
  /// `spec` stand for, from their definition.
  torch::Tensor dequantized_reference(const LayerSpec& spec) const {
    auto module = model_->named_modules()[spec.path];
    auto* quantized = module->as<QuantizedLinearImpl>();
    if (quantized == nullptr) {
      quantized = module->as<LoRALinearImpl>()->quantized_base();
    }
    return torchlora_test::reference_dequantized(*quantized);
  }

  void do_quantize(const Op& op) {
    std::vector<const LayerSpec*> targets;
    for (const auto* spec : chosen_layers(op.layer_mask)) {
      if (spec->kind == Kind::linear) {
        targets.push_back(spec);
      }
    }
    if (targets.empty()) {
      last_outcome_ = "no Linear layer chosen";
      return;
    }
    std::string why;
    std::vector<std::string> paths;
    std::vector<const LayerSpec*> changed;
    for (const auto* spec : targets) {
      paths.push_back(spec->path);
      const auto& layer = world_.layers.at(spec->path);
      const auto found = world_.quantized.find(spec->path);
      if (found != world_.quantized.end()) {
        if (found->second != op.variant) {
          why = "the layer is quantized already, another way";
        }
        continue; // left as it is
      }
      changed.push_back(spec);
      if (spec->bound) {
        why = "a LibTorch module reads the layer through its own member";
      } else if (family_.tied) {
        why = "the layer's weight is tied";
      } else if (layer.lora && !layer.adapters.empty()) {
        why = "the layer has adapters";
      }
    }
    if (world_.routed()) {
      why = "an AdapterRouting lives";
    } else if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    const auto format =
        op.variant == 0 ? QuantizedFormat::int8 : QuantizedFormat::nf4;
    const auto options =
        QuantizeOptions()
            .quantization(QuantizedLinearOptions().format(format).double_quant(
                op.variant == 2))
            .target_modules(paths);
    if (!attempt(
            why.empty() ? 1 : 0, why, [&] { quantize(*model_, options); })) {
      return;
    }
    torch::NoGradGuard no_grad;
    for (const auto* spec : changed) {
      world_.quantized[spec->path] = op.variant;
      world_.base.at(spec->path).copy_(dequantized_reference(*spec));
    }
    ++tally()["~ layers quantized"];
  }

  void do_dequantize() {
    std::string why;
    if (world_.routed()) {
      why = "an AdapterRouting lives";
    } else if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    if (!attempt(why.empty() ? 1 : 0, why, [&] { dequantize(*model_); })) {
      return;
    }
    world_.quantized.clear();
  }

  void do_disable() {
    const std::string why = world_.held() ? "an AdaptedWeights lives" : "";
    Scope scope;
    scope.type = Scope::disable;
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          scope.disabled = std::make_unique<DisableAdapters>(*model_);
        })) {
      return;
    }
    for (auto& [path, layer] : world_.layers) {
      if (!layer.lora) {
        continue;
      }
      scope.saved[path] = {layer.generation, layer.enabled, layer.merged};
      layer.merged = 0;
      layer.merged_from.clear();
      layer.enabled = false;
    }
    world_.scopes.push_back(std::move(scope));
  }

  void do_route(const Op& op) {
    std::string why;
    const auto names = world_.adapter_names();
    for (const auto& name : op.names) {
      if (name != "__base__" &&
          std::find(names.begin(), names.end(), name) == names.end()) {
        why = "a row's adapter does not exist";
      }
    }
    if (is_bound(family_) && world_.any_lora()) {
      why = "the model's layers are bound";
    }
    Scope scope;
    scope.type = Scope::routing;
    scope.rows = op.names;
    for (const auto& [path, layer] : world_.layers) {
      if (layer.lora) {
        scope.covers.insert(path);
      }
    }
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          scope.routed = std::make_unique<AdapterRouting>(*model_, op.names);
        })) {
      return;
    }
    world_.scopes.push_back(std::move(scope));
  }

  void do_adapted(const Op& op) {
    std::string why;
    if (is_bound(family_)) {
      for (const auto& [path, layer] : world_.layers) {
        if (layer.lora && layer.merged != 0 && layer.stale()) {
          why = "a merged layer's adapters changed";
        }
      }
    }
    Scope scope;
    scope.type = Scope::adapted;
    scope.grad = op.flag;
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          if (op.flag) {
            scope.adapted_weights = std::make_unique<AdaptedWeights>(*model_);
          } else {
            torch::NoGradGuard no_grad;
            scope.adapted_weights = std::make_unique<AdaptedWeights>(*model_);
          }
        })) {
      return;
    }
    // It holds the bound layers only (a model without any: a no-op).
    for (const auto& spec : family_.layers) {
      const auto& layer = world_.layers.at(spec.path);
      if (layer.lora && spec.bound) {
        scope.captured[spec.path] = layer;
      }
    }
    world_.scopes.push_back(std::move(scope));
  }

  void do_pop() {
    if (world_.scopes.empty()) {
      last_outcome_ = "no scope open";
      return;
    }
    auto& scope = world_.scopes.back();
    if (scope.type == Scope::disable) {
      for (auto& [path, saved] : scope.saved) {
        auto& layer = world_.layers.at(path);
        const auto& [generation, enabled, merged] = saved;
        if (!layer.lora || layer.generation != generation) {
          continue; // unloaded meanwhile
        }
        layer.enabled = enabled;
        if (merged != 0 && layer.has_active()) {
          // In place unless an adapter made active meanwhile refuses it
          // (DoRA): then keeping the original.
          layer.merged = merged == 2 && layer.has_active_dora() ? 1 : merged;
          layer.merged_from = layer.active_now();
        }
      }
    }
    world_.scopes.pop_back();
    last_outcome_ = "done";
  }

  void do_backward(const Op& op) {
    clear_gradients();
    const auto refusal = forward_refusal();
    torch::manual_seed(static_cast<uint64_t>(op.seed % 1000003));
    const auto input = family_.input.to(input_dtype());
    torch::Tensor out;
    try {
      out = family_.forward(*model_, input);
    } catch (const c10::Error& error) {
      const std::string message = error.what_without_backtrace();
      if (refusal.empty() || message.rfind("torchlora:", 0) != 0) {
        fail("the forward was refused: " + message);
      }
      last_outcome_ = "forward refused";
      return;
    }
    if (!refusal.empty()) {
      fail("the forward ran, though " + refusal);
    }
    const auto weights = torch::randn(out.sizes(), torch::kFloat64);
    const auto loss = (out * weights.to(out.scalar_type())).sum();
    // A backward through an AdaptedWeights whose adapters changed since it
    // was made is refused.
    std::string stale;
    for (const auto& spec : family_.layers) {
      const auto* holder = world_.holder_of(spec.path);
      if (holder != nullptr && holder->grad) {
        const auto& path = spec.path;
        const auto& held = holder->captured.at(path);
        {
          if (held.merged != 0 || !held.enabled) {
            continue;
          }
          const auto& now = world_.layers.at(path);
          for (const auto& adapter : held.adapters) {
            if (!adapter.active) {
              continue;
            }
            const auto* current =
                const_cast<LayerState&>(now).find(adapter.name);
            if (current == nullptr || !torch::equal(current->A, adapter.A) ||
                !torch::equal(current->B, adapter.B)) {
              stale = "the AdaptedWeights' adapters changed since it was made";
            }
          }
        }
      }
    }
    bool backward_ran = false;
    if (loss.requires_grad()) {
      try {
        loss.backward();
        backward_ran = true;
      } catch (const c10::Error& error) {
        const std::string message = error.what_without_backtrace();
        if (stale.empty() || message.rfind("torchlora:", 0) != 0) {
          fail("the backward was refused: " + message);
        }
        clear_gradients();
        last_outcome_ = "backward refused";
        return;
      }
    }
    if (!stale.empty() && backward_ran) {
      fail("the backward ran, though " + stale);
    }
    // The float64 model's gradients.
    make_leaves();
    const bool deterministic =
        !world_.training || (!family_.dropout && !any_dropout_active());
    const bool plain_training = world_.plain->is_training();
    world_.plain->train(world_.training);
    torch::manual_seed(static_cast<uint64_t>(op.seed % 1000003));
    const auto want = reference_output(true);
    world_.plain->train(plain_training);
    std::vector<torch::Tensor> leaves;
    std::vector<std::pair<AdapterState*, char>> where;
    for (auto& [path, layer] : world_.layers) {
      for (auto& adapter : layer.adapters) {
        if (adapter.active) {
          for (const char matrix : adapter.matrices()) {
            leaves.push_back(adapter.grad(matrix));
            where.emplace_back(&adapter, matrix);
          }
        }
      }
    }
    const auto ref_loss = (want * weights).sum();
    std::vector<torch::Tensor> grads(leaves.size());
    if (ref_loss.requires_grad() && !leaves.empty()) {
      grads = torch::autograd::grad({ref_loss}, leaves, {}, false, false, true);
    }
    if (deterministic) {
      expect_close(out.detach(), want.detach(), "training output");
    }
    for (auto& [path, layer] : world_.layers) {
      for (auto& adapter : layer.adapters) {
        adapter.grad_A = torch::Tensor();
        adapter.grad_B = torch::Tensor();
        adapter.grad_m = torch::Tensor();
      }
    }
    for (size_t i = 0; i < where.size(); ++i) {
      auto& [adapter, matrix] = where[i];
      adapter->grad(matrix) = grads[i];
    }
    for (const auto& spec : family_.layers) {
      for (auto& adapter : world_.layers.at(spec.path).adapters) {
        for (const char matrix : adapter.matrices()) {
          const auto p = parameter(spec, adapter.name, matrix);
          const auto& want_grad = adapter.grad(matrix);
          const auto what = spec.path + " " + adapter.name + " grad " + matrix;
          if (p.grad().defined() != want_grad.defined()) {
            fail(
                what +
                (p.grad().defined()
                     ? " is defined, but no gradient reaches it"
                     : " is undefined, but a gradient reaches it"));
          }
          if (deterministic && want_grad.defined()) {
            expect_close(p.grad(), want_grad, what, 10);
            ++tally()["~ gradients compared"];
          }
          if (!deterministic && want_grad.defined()) {
            // Values differ with the dropout masks: keep the model's.
            adapter.grad(matrix) =
                p.grad().detach().to(torch::kFloat64).clone();
          }
        }
      }
    }
    last_outcome_ =
        deterministic ? "gradients agree" : "gradients defined alike";
  }

  void do_step(const Op& op) {
    std::vector<torch::Tensor> params;
    for (const auto& p : model_->parameters()) {
      if (p.requires_grad()) {
        params.push_back(p);
      }
    }
    // The float64 model's leaves: the active adapters, with its gradients.
    std::vector<torch::Tensor> leaves;
    std::vector<std::pair<AdapterState*, char>> where;
    for (auto& [path, layer] : world_.layers) {
      for (auto& adapter : layer.adapters) {
        if (!adapter.active) {
          continue;
        }
        for (const char matrix : adapter.matrices()) {
          auto leaf = adapter.value(matrix).clone().set_requires_grad(true);
          const auto& grad = adapter.grad(matrix);
          if (grad.defined()) {
            leaf.mutable_grad() = grad.clone();
          }
          leaves.push_back(leaf);
          where.emplace_back(&adapter, matrix);
        }
      }
    }
    if (op.variant == 3) {
      // A raw update through .data(), as LibTorch 1.13's SGD takes a step.
      torch::manual_seed(static_cast<uint64_t>(op.seed % 1000003));
      for (const auto& spec : family_.layers) {
        for (auto& adapter : world_.layers.at(spec.path).adapters) {
          if (!adapter.active) {
            continue;
          }
          for (const char matrix : adapter.matrices()) {
            auto p = parameter(spec, adapter.name, matrix);
            auto change = torch::randn(p.sizes(), torch::kFloat64) * op.value;
            if (world_.f32) {
              change = as_f32_values(change);
            }
            p.data().add_(change.to(p.scalar_type()));
            auto& value = adapter.value(matrix);
            value = value + change;
            if (world_.f32) {
              value = as_f32_values(value);
            }
          }
        }
      }
      last_outcome_ = "done";
      return;
    }
    const auto step = [&](std::vector<torch::Tensor> tensors) {
      if (tensors.empty()) {
        return;
      }
      if (op.variant == 0) {
        torch::optim::SGD(tensors, torch::optim::SGDOptions(op.value)).step();
      } else if (op.variant == 1) {
        torch::optim::Adam(
            tensors, torch::optim::AdamOptions(op.value).eps(1e-2))
            .step();
      } else {
        torch::optim::AdamW(
            tensors,
            torch::optim::AdamWOptions(op.value).eps(1e-2).weight_decay(0.1))
            .step();
      }
    };
    step(params);
    {
      torch::NoGradGuard no_grad;
      step(leaves);
    }
    for (size_t i = 0; i < where.size(); ++i) {
      auto& [adapter, matrix] = where[i];
      auto value = leaves[i].detach().clone();
      adapter->value(matrix) = world_.f32 ? as_f32_values(value) : value;
    }
    last_outcome_ = "done";
  }

  void do_save_load() {
    // A merged layer unmerges to load, which a live AdaptedWeights refuses
    // (the layers loaded before it are loaded with equal values).
    bool merged = false;
    for (const auto& [path, layer] : world_.layers) {
      merged = merged || (layer.lora && layer.merged != 0);
    }
    const int must = world_.held() && merged ? -1 : 1;
    std::stringstream buffer;
    if (!attempt(must, "", [&] {
          torch::save(model_, buffer);
          torch::load(model_, buffer);
        })) {
      return;
    }
    // Loading re-merges merged layers with the adapters loaded.
    for (auto& [path, layer] : world_.layers) {
      if (layer.lora && layer.merged != 0) {
        layer.merged_from = layer.active_now();
      }
    }
  }

  void do_adapter_file(const Op& op) {
    const auto names = world_.adapter_names();
    const bool exists =
        std::find(names.begin(), names.end(), op.name) != names.end();
    const auto dir = (dir_ / std::to_string(index_)).string();
    // peft's config holds one use_rslora for the layers it lists (an
    // attention's out_proj comes with its attention, unlisted).
    std::set<bool> rslora;
    std::set<bool> dora; // and one use_dora
    for (const auto& spec : family_.layers) {
      auto& layer = world_.layers.at(spec.path);
      const auto* adapter = layer.find(op.name);
      if (adapter == nullptr) {
        continue;
      }
      bool with_attention = false;
      for (const auto& other : family_.layers) {
        if (other.companion == spec.path &&
            world_.layers.at(other.path).find(op.name) != nullptr) {
          with_attention = true;
        }
      }
      if (!with_attention) {
        rslora.insert(adapter->rslora);
      }
      dora.insert(adapter->dora);
    }
    // peft adapts an attention's out_proj with the attention's options.
    bool companion_differs = false;
    for (const auto& spec : family_.layers) {
      if (spec.companion.empty()) {
        continue;
      }
      const auto* attention = world_.layers.at(spec.path).find(op.name);
      const auto* out_proj = world_.layers.at(spec.companion).find(op.name);
      if (attention != nullptr && out_proj != nullptr &&
          (attention->rank != out_proj->rank ||
           attention->alpha != out_proj->alpha ||
           attention->rslora != out_proj->rslora)) {
        companion_differs = true;
      }
    }
    const std::string save_refusal = !exists ? "no layer has the adapter"
        : rslora.size() > 1                  ? "its layers disagree on rsLoRA"
        : dora.size() > 1                    ? "its layers disagree on DoRA"
        : companion_differs ? "an attention's out_proj has other options"
                            : "";
    if (!attempt(save_refusal.empty() ? 1 : 0, save_refusal, [&] {
          save_adapter(
              *model_, dir, SaveAdapterOptions().adapter_name(op.name));
        })) {
      return;
    }
    // What the file holds, for the reload.
    std::map<std::string, AdapterState> saved;
    for (auto& [path, layer] : world_.layers) {
      if (auto* adapter = layer.find(op.name)) {
        saved[path] = *adapter;
      }
    }
    if (op.variant == 1) {
      // A config without auto_mapping (or peft_version) counts an
      // attention's out_proj delta once, as torchlora wrote before: the
      // halved B that save_adapter wrote for peft loads as it is.
      const auto config =
          std::filesystem::path(dir) / op.name / "adapter_config.json";
      nlohmann::ordered_json json;
      {
        std::ifstream in(config);
        json = nlohmann::ordered_json::parse(in);
      }
      json.erase("auto_mapping");
      std::ofstream(config) << json.dump(2);
      for (const auto& spec : family_.layers) {
        if (!spec.companion.empty() && saved.count(spec.path) != 0 &&
            saved.count(spec.companion) != 0) {
          saved[spec.companion].B = saved[spec.companion].B / 2;
        }
      }
    }
    do_remove(op);
    if (last_outcome_ != "done") {
      return;
    }
    std::string why;
    for (const auto& [path, layer] : world_.layers) {
      if (layer.lora && layer.merged != 0) {
        why = "a layer is merged";
      }
      if (layer.lora && !layer.enabled) {
        why = "the adapters are disabled";
      }
    }
    if (world_.routed()) {
      why = "an AdapterRouting lives";
    } else if (world_.held()) {
      why = "an AdaptedWeights lives";
    }
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          load_adapter(*model_, dir, op.name);
        })) {
      return;
    }
    for (auto& [path, adapter] : saved) {
      auto& layer = world_.layers.at(path);
      if (!layer.lora) {
        layer.generation = ++generations_;
      }
      layer.lora = true;
      adapter.scale = 1;
      adapter.active = true;
      adapter.grad_A = torch::Tensor();
      adapter.grad_B = torch::Tensor();
      adapter.grad_m = torch::Tensor();
      layer.adapters.push_back(adapter);
    }
    // The file keeps one dropout; the values stay as they were.
    for (const auto& spec : family_.layers) {
      auto* adapter = world_.layers.at(spec.path).find(op.name);
      if (adapter == nullptr) {
        continue;
      }
      auto* lora =
          dynamic_cast<LoRALayer*>(model_->named_modules()[spec.path].get());
      adapter->dropout = lora->adapter_options(op.name).dropout();
      if (lora->adapter_options(op.name).rank() != adapter->rank) {
        fail(spec.path + ": the reloaded rank differs");
      }
      const auto& options = lora->adapter_options(op.name);
      const double s = options.use_rslora()
          ? options.alpha() / std::sqrt(static_cast<double>(options.rank()))
          : options.alpha() / static_cast<double>(options.rank());
      AdapterState copy = *adapter;
      copy.scale = 1;
      if (std::abs(s - copy.s()) > 1e-12 * std::abs(s)) {
        fail(
            spec.path + ": the reloaded scaling " + std::to_string(s) +
            " differs from " + std::to_string(copy.s()));
      }
    }
  }

  void do_clone() {
    if (family_.tied) {
      last_outcome_ = "skipped (LibTorch cannot clone tied members)";
      return;
    }
    std::string why;
    for (const auto& [path, layer] : world_.layers) {
      if (layer.lora && layer.merged != 0 && layer.stale()) {
        why = "a merged layer's adapters changed";
      }
      if (layer.lora && !layer.enabled) {
        why = "the adapters are disabled";
      }
    }
    std::shared_ptr<nn::Module> copy;
    if (!attempt(why.empty() ? 1 : 0, why, [&] {
          copy = clone_keeping_trainable(*model_);
        })) {
      return;
    }
    if (world_.scopes.empty()) {
      model_ = copy;
      clear_gradients();
      return;
    }
    // The scopes belong to the model: the copy is checked outside any, then
    // dropped.
    torch::NoGradGuard no_grad;
    copy->eval();
    std::unique_ptr<AdaptedWeights> adapted;
    if (is_bound(family_)) {
      adapted = std::make_unique<AdaptedWeights>(*copy);
    }
    const auto got = family_.forward(*copy, family_.input.to(input_dtype()));
    std::vector<Scope> scopes;
    std::swap(scopes, world_.scopes);
    const bool plain_training = world_.plain->is_training();
    world_.plain->eval();
    const auto want = reference_output(false);
    world_.plain->train(plain_training);
    std::swap(scopes, world_.scopes);
    expect_close(got, want, "the clone's output outside the scopes");
    last_outcome_ = "done (inside scopes, checked and dropped)";
  }

  void do_to(bool f32) {
    const auto dtype = f32 ? torch::kFloat32 : torch::kFloat64;
    if (!attempt(1, "", [&] { model_->to(dtype); })) {
      return;
    }
    clear_gradients();
    if (f32 && !world_.f32) {
      world_.ever_f32 = true;
      world_.plain->to(torch::kFloat32);
      world_.plain->to(torch::kFloat64);
      const auto modules = world_.plain->named_modules();
      for (const auto& spec : family_.layers) {
        world_.base[spec.path] = weight_member(*modules[spec.path], spec.kind);
      }
      const auto round_layer = [](LayerState& layer) {
        for (auto& adapter : layer.adapters) {
          adapter.A = as_f32_values(adapter.A);
          adapter.B = as_f32_values(adapter.B);
          adapter.m = as_f32_values(adapter.m);
        }
        for (auto& [name, A, B, s, m] : layer.merged_from) {
          A = as_f32_values(A);
          B = as_f32_values(B);
          m = as_f32_values(m);
        }
      };
      for (auto& [path, layer] : world_.layers) {
        round_layer(layer);
      }
      for (auto& scope : world_.scopes) {
        for (auto& [path, layer] : scope.captured) {
          round_layer(layer);
        }
      }
    }
    world_.f32 = f32;
    // Quantized layers dequantize from their scales, now in `dtype`.
    torch::NoGradGuard no_grad;
    for (const auto& spec : family_.layers) {
      if (world_.quantized.count(spec.path) > 0) {
        world_.base.at(spec.path).copy_(dequantized_reference(spec));
      }
    }
    // AdaptedWeights compute their weights anew, from the adapters now, each
    // in the grad mode it was made in.
    for (auto& scope : world_.scopes) {
      if (scope.type == Scope::adapted) {
        for (auto& [path, layer] : scope.captured) {
          layer = world_.layers.at(path);
        }
      }
    }
  }

  const Family& family_;
  bool verbose_;
  std::shared_ptr<nn::Module> model_;
  World world_;
  std::filesystem::path dir_;
  size_t index_ = 0;
  int generations_ = 0;
  std::string last_outcome_;
};

/// The failure of `ops` on `family`, or "" when they all pass.
std::string failure_of(const Family& family, const std::vector<Op>& ops) {
  try {
    Runner runner(family, false);
    runner.run(ops);
  } catch (const Failure& failure) {
    return failure.what();
  } catch (const std::exception& error) {
    return std::string("unexpected exception: ") + error.what();
  }
  return "";
}

/// The shortest sub-sequence of `ops` found (dropping one operation at a
/// time, then pairs) that still fails.
std::vector<Op> shrink(const Family& family, std::vector<Op> ops) {
  bool smaller = true;
  while (smaller) {
    smaller = false;
    for (size_t i = ops.size(); i-- > 0;) {
      auto fewer = ops;
      fewer.erase(fewer.begin() + static_cast<std::ptrdiff_t>(i));
      if (!failure_of(family, fewer).empty()) {
        ops = fewer;
        smaller = true;
      }
    }
  }
  return ops;
}

int64_t env_or(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? std::stoll(value) : fallback;
}

/// Keeps LibTorch warnings (a scale not saved, an adapter made active) out
/// of the test's output: thousands of operations give many.
#if TORCH_VERSION_MAJOR >= 2
using WarningHandlerGuard = c10::WarningUtils::WarningHandlerGuard;
#else
using WarningHandlerGuard = c10::Warning::WarningHandlerGuard;
#endif

struct QuietWarnings : c10::WarningHandler {
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& /*warning*/) override {}
#else
  void process(
      const c10::SourceLocation& /*location*/,
      const std::string& /*message*/,
      const bool /*verbatim*/) override {}
#endif
};

TEST(StatefulTest, RandomOperationSequencesAgreeWithAFloat64Model) {
  QuietWarnings quiet;
  WarningHandlerGuard guard(&quiet);
  const auto all = families();
  tally().clear();
  const auto sequences = env_or("TORCHLORA_STATEFUL_SEQUENCES", 300);
  const auto first = env_or("TORCHLORA_STATEFUL_SEED", 1);
  const auto started = std::chrono::steady_clock::now();
  int64_t operations = 0;
  std::map<std::string, int> per_family;
  for (int64_t seed = first; seed < first + sequences; ++seed) {
    std::mt19937_64 rng(static_cast<uint64_t>(seed));
    const auto& family = all[static_cast<size_t>(seed) % all.size()];
    const auto ops = generate(family, rng);
    operations += static_cast<int64_t>(ops.size());
    ++per_family[family.name];
    const auto failure = failure_of(family, ops);
    if (failure.empty()) {
      continue;
    }
    const auto shortest = shrink(family, ops);
    std::ostringstream repro;
    repro << "sequence " << seed << " on the " << family.name
          << " model failed: " << failure << "\nshortest failing sequence ("
          << shortest.size() << " of " << ops.size() << " operations), "
          << "its run:\n";
    std::cout << repro.str();
    try {
      Runner runner(family, true);
      runner.run(shortest);
    } catch (const Failure& again) {
      repro << "  fails at " << again.what() << "\n";
    }
    ADD_FAILURE() << repro.str();
    return;
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started)
          .count();
  std::cout << "stateful: " << sequences << " sequences (seeds " << first
            << " to " << first + sequences - 1 << "), " << operations
            << " operations, no failure, " << seconds << " s;";
  for (const auto& [name, count] : per_family) {
    std::cout << " " << name << " " << count;
  }
  std::cout << "\n";
  for (const auto& [what, count] : tally()) {
    std::cout << "  " << what << ": " << count << "\n";
  }
}

} // namespace

} // namespace torchlora_stateful_test
