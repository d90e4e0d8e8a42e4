#pragma once

#include <torchlora/options.h>

#include <torch/types.h>

#include <string>
#include <vector>

namespace torchlora {

/// What every LoRA layer of torchlora offers, whatever its base layer type.
///
/// Model-wide functions (`count_parameters`, `mark_only_lora_as_trainable`,
/// `inject_lora`, ...) find LoRA layers through this interface:
/// ```
/// model->apply([](torch::nn::Module& m) {
///   if (auto* lora = dynamic_cast<torchlora::LoRALayer*>(&m)) {
///     std::cout << lora->adapter_names().size() << "\n";
///   }
/// });
/// ```
class LoRALayer {
 public:
  virtual ~LoRALayer() = default;

  /// Names of the attached adapters, in the order they were added.
  virtual std::vector<std::string> adapter_names() const = 0;

  /// Attaches a new adapter named `name` and freezes the base layer.
  virtual void add_adapter(
      const std::string& name,
      const LoRAOptions& options) = 0;

  /// Removes adapter `name`: its tensors leave `named_parameters()`.
  virtual void delete_adapter(const std::string& name) = 0;

  /// True if an adapter of this name is attached.
  virtual bool has_adapter(const std::string& name) const = 0;

  /// The trainable tensors of every adapter (A and B of each).
  virtual std::vector<torch::Tensor> adapter_parameters() const = 0;

  /// The frozen base layer's bias; undefined when the base has none.
  virtual torch::Tensor base_bias() const = 0;
};

} // namespace torchlora
