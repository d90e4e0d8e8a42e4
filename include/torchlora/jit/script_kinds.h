#pragma once

// What torchlora reads from a TorchScript module: the PyTorch class of each
// submodule (the layer kinds it adapts), the settings scripting and tracing
// keep, and which submodules the module's code runs. Not part of the API.

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>

#include <map>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {
namespace jit {
namespace detail {

/// A TorchScript module's class name without `__torch__.` and the
/// `___torch_mangle_<n>.` parts scripting adds, e.g.
/// "torch.nn.modules.linear.Linear".
inline std::string script_type_name(const torch::jit::Module& module) {
  const auto name = module.type()->name();
  auto text = name ? name->qualifiedName() : std::string("<unnamed>");
  static const std::regex mangle("___torch_mangle_[0-9]+\\.");
  text = std::regex_replace(text, mangle, "");
  const std::string prefix = "__torch__.";
  if (text.rfind(prefix, 0) == 0) {
    text = text.substr(prefix.size());
  }
  return text;
}

/// The kinds of TorchScript layers torchlora adapts.
enum class ScriptKind { linear, embedding, conv1d, conv2d, conv3d, attention };

/// The kind of `module` (by its class, which scripting and tracing keep from
/// PyTorch's own `torch.nn` classes), or none.
inline std::optional<ScriptKind> script_kind(const torch::jit::Module& module) {
  static const std::map<std::string, ScriptKind> kinds = {
      {"torch.nn.modules.linear.Linear", ScriptKind::linear},
      {"torch.nn.modules.linear.NonDynamicallyQuantizableLinear",
       ScriptKind::linear},
      {"torch.nn.modules.sparse.Embedding", ScriptKind::embedding},
      {"torch.nn.modules.conv.Conv1d", ScriptKind::conv1d},
      {"torch.nn.modules.conv.Conv2d", ScriptKind::conv2d},
      {"torch.nn.modules.conv.Conv3d", ScriptKind::conv3d},
      {"torch.nn.modules.activation.MultiheadAttention", ScriptKind::attention},
  };
  const auto found = kinds.find(script_type_name(module));
  if (found == kinds.end()) {
    return std::nullopt;
  }
  return found->second;
}

/// The attribute a kind's adapter changes.
inline const char* adapted_attribute(ScriptKind kind) {
  return kind == ScriptKind::attention ? "in_proj_weight" : "weight";
}

/// The value of `module`'s attribute or constant `name` (scripted modules
/// keep PyTorch's layer settings as either; traced ones keep neither).
inline std::optional<c10::IValue> setting_of(
    const torch::jit::Module& module,
    const std::string& name) {
  const auto type = module.type();
  if (type->hasConstant(name)) {
    return type->getConstant(name);
  }
  if (type->hasAttribute(name)) {
    return module.attr(name);
  }
  return std::nullopt;
}

/// True when `module` has a tensor attribute `name` (a traced layer without
/// a bias has no `bias` attribute at all; a scripted one holds None).
inline bool has_tensor(
    const torch::jit::Module& module,
    const std::string& name) {
  return module.hasattr(name) && module.attr(name).isTensor();
}

/// The constant argument `index` of the first node of `module`'s forward
/// whose kind is one of `kinds` (what a traced layer keeps of its settings).
inline std::optional<c10::IValue> graph_constant(
    const torch::jit::Module& module,
    const std::vector<std::string>& kinds,
    size_t index) {
  const auto method = module.find_method("forward");
  if (!method) {
    return std::nullopt;
  }
  for (const auto* node : method->graph()->nodes()) {
    const std::string kind = node->kind().toQualString();
    for (const auto& wanted : kinds) {
      if (kind == wanted && node->inputs().size() > index) {
        return torch::jit::toIValue(node->inputs()[index]);
      }
    }
  }
  return std::nullopt;
}

/// True when `module`'s forward calls `op` (e.g. "aten::embedding_renorm_").
inline bool graph_calls(const torch::jit::Module& module, const char* op) {
  const auto method = module.find_method("forward");
  if (!method) {
    return false;
  }
  for (const auto* node : method->graph()->nodes()) {
    if (std::string(node->kind().toQualString()) == op) {
      return true;
    }
  }
  return false;
}

/// The paths of the submodules that `module`'s code reaches: through
/// `self.a.b` chains in any of its methods and forward hooks, or in those of
/// the submodules it reaches; every element of a ModuleList or ModuleDict
/// indexed by a variable. A module not among them is never run: a second
/// name of a module that a traced model recorded under its first (saving
/// makes each name a module of its own), or a layer nothing calls. (It can
/// count too much, never too little: a submodule's method that nothing
/// calls counts.)
inline std::set<std::string> reachable_paths(const torch::jit::Module& module) {
  using Found = std::pair<std::string, torch::jit::Module>;
  std::set<std::string> reached = {""};
  std::vector<Found> pending = {{"", module}};
  const auto reach = [&](const std::string& path,
                         const torch::jit::Module& child) {
    if (reached.insert(path).second) {
      pending.emplace_back(path, child);
    }
  };
  const auto join = [](const std::string& path, const std::string& name) {
    return path.empty() ? name : path + "." + name;
  };
  const auto visit = [&](const torch::jit::Graph& graph, const Found& self) {
    // The module each value of the graph is, by path.
    std::map<const torch::jit::Value*, Found> modules = {
        {graph.inputs().at(0), self}};
    std::vector<const torch::jit::Block*> blocks = {graph.block()};
    while (!blocks.empty()) {
      const auto* block = blocks.back();
      blocks.pop_back();
      for (const auto* node : block->nodes()) {
        for (const auto* inner : node->blocks()) {
          blocks.push_back(inner);
        }
        const auto owner = node->inputs().empty()
            ? modules.end()
            : modules.find(node->input(0));
        if (owner == modules.end()) {
          continue;
        }
        const auto& [owner_path, owner_module] = owner->second;
        if (node->kind() == c10::prim::ModuleContainerIndex) {
          for (const auto& child : owner_module.named_children()) {
            reach(join(owner_path, child.name), child.value);
          }
          continue;
        }
        if (node->kind() != c10::prim::GetAttr) {
          continue;
        }
        const auto name = node->s(c10::attr::name);
        if (!owner_module.hasattr(name) ||
            !owner_module.attr(name).isModule()) {
          continue;
        }
        const Found child = {
            join(owner_path, name), owner_module.attr(name).toModule()};
        modules[node->output()] = child;
        reach(child.first, child.second);
      }
    }
  };
  while (!pending.empty()) {
    const auto current = pending.back();
    pending.pop_back();
    for (const auto& method : current.second.get_methods()) {
      visit(*method.graph(), current);
    }
    const auto type = current.second.type();
    for (auto* hooks :
         {&type->getForwardHooks(), &type->getForwardPreHooks()}) {
      for (auto* hook : *hooks) {
        visit(*torch::jit::toGraphFunction(*hook).graph(), current);
      }
    }
  }
  return reached;
}

} // namespace detail
} // namespace jit
} // namespace torchlora
