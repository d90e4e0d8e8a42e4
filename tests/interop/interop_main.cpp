// The C++ side of the peft interop check (tests/interop/peft_interop.py).
// Every case is a small model in float64 with one or more adapters; the
// Python file defines the same cases on the Python twins of these models.
//
//   torchlora_interop export DIR  for each case, in DIR/<case>/: the base
//                                 weights (base.safetensors), inputs
//                                 (input.safetensors), the adapters after one
//                                 training step, saved with save_adapter
//                                 (cpp_adapter/), and the adapted outputs,
//                                 one per adapter (cpp_output.safetensors)
//   torchlora_interop check DIR   for each case, loads the adapters peft saved
//                                 (DIR/<case>/peft_adapter/) into the base
//                                 model and compares each adapter's output
//                                 with peft's (peft_output.safetensors) and
//                                 with the float64 reference that Python
//                                 computed from peft's file with plain ops
//                                 (reference_output.safetensors)
//   torchlora_interop cases       prints the case names
#include "interop_cases.h"

#include <torchlora/torchlora.h>

#include <algorithm>
#include <filesystem>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

namespace {

using namespace torchlora_interop;

void save_tensors(const std::string& path, const Tensors& tensors) {
  torchlora::safetensors::save(path, tensors);
}

/// One small gradient step (scaled to its largest entry) on every tensor
/// that has a gradient, which it clears.
void step_on_gradients(InteropModel& model) {
  torch::NoGradGuard no_grad;
  for (auto& parameter : model.parameters()) {
    if (parameter.grad().defined()) {
      const auto& grad = parameter.grad();
      parameter.sub_(0.05 * grad / (1 + grad.abs().max()));
      parameter.mutable_grad().reset();
    }
  }
}

/// That step on everything trainable, for each adapter in turn, so that
/// biases and modules to save differ from the base as after training.
void train_one_step(InteropModel& model, const Case& test, const Tensors& in) {
  model.train();
  for (const auto& config : test.adapters) {
    torchlora::set_adapter(model, config.adapter_name());
    {
      torchlora::AdaptedWeights adapted(model);
      model.run(in).square().mean().backward();
    }
    step_on_gradients(model);
  }
}

std::string folder_of(const std::string& dir, const Case& test) {
  return (std::filesystem::path(dir) / test.name).string();
}

/// The inits that factorize the base weight (PiSSA, OLoRA), on the Mlp in
/// float32: peft runs them in float32 only. In DIR/<name>, as for the
/// other cases.
std::vector<std::pair<std::string, torchlora::LoRAConfig>> weight_init_cases() {
  const auto config = [](torchlora::LoRAInit init) {
    return torchlora::LoRAConfig(2).alpha(4).init(init).target_modules(
        {"fc1", "fc2"});
  };
  return {
      {"init_pissa", config(torchlora::LoRAInit::pissa)},
      {"init_olora", config(torchlora::LoRAInit::olora)}};
}

void export_weight_inits(const std::string& dir) {
  for (const auto& [name, config] : weight_init_cases()) {
    const auto folder = (std::filesystem::path(dir) / name).string();
    std::filesystem::create_directories(folder);
    torch::manual_seed(0);
    Mlp model;
    Tensors base;
    for (const auto& item : model.named_parameters()) {
      base.insert(item.key(), item.value().detach().clone());
    }
    save_tensors(folder + "/base.safetensors", base);
    const auto inputs = tensors_of({{"x", torch::randn({6, 12})}});
    save_tensors(folder + "/input.safetensors", inputs);
    torchlora::inject_lora(model, config);
    model.run(inputs).square().mean().backward();
    step_on_gradients(model);
    torchlora::save_adapter(model, folder + "/cpp_adapter", config);
    torch::NoGradGuard no_grad;
    save_tensors(
        folder + "/cpp_output.safetensors",
        tensors_of({{"y_default", model.run(inputs)}}));
  }
}

/// Loads the adapter peft initialized and trained into the untouched base
/// (load_adapter runs the init on it, as peft's loading does) and compares
/// the outputs, in float32.
int check_weight_inits(const std::string& dir, int& compared) {
  int failures = 0;
  for (const auto& [name, config] : weight_init_cases()) {
    const auto folder = (std::filesystem::path(dir) / name).string();
    Mlp model;
    const auto base =
        torchlora::safetensors::load(folder + "/base.safetensors");
    {
      torch::NoGradGuard no_grad;
      for (auto& item : model.named_parameters()) {
        item.value().copy_(base[item.key()]);
      }
    }
    torchlora::load_adapter(model, folder + "/peft_adapter");
    const auto inputs =
        torchlora::safetensors::load(folder + "/input.safetensors");
    torch::NoGradGuard no_grad;
    const auto got = model.run(inputs);
    const auto peft =
        torchlora::safetensors::load(folder + "/peft_output.safetensors");
    const double difference = largest_difference(got, peft["y_default"]);
    // float32, and two SVD (QR) implementations: LibTorch's and PyTorch's.
    const bool ok = difference <= 1e-5;
    failures += ok ? 0 : 1;
    ++compared;
    std::cout << "torchlora_interop: peft -> torchlora " << name
              << " y_default: largest difference to peft " << difference
              << " (float32)" << (ok ? "" : "  FAILED") << "\n";
  }
  return failures;
}

int export_files(const std::string& dir) {
  for (const auto& test : cases()) {
    const auto folder = folder_of(dir, test);
    std::filesystem::create_directories(folder);
    torch::manual_seed(0);
    auto model = test.make();
    model->to(torch::kFloat64);
    Tensors base;
    for (const auto& item : model->named_parameters()) {
      base.insert(item.key(), item.value().detach());
    }
    save_tensors(folder + "/base.safetensors", base);
    const auto inputs = test.inputs();
    save_tensors(folder + "/input.safetensors", inputs);
    for (auto config : test.adapters) {
      torchlora::inject_lora(*model, config.init(torchlora::LoRAInit::random));
    }
    train_one_step(*model, test, inputs);
    for (const auto& config : test.adapters) {
      if (test.save_with_config) {
        torchlora::save_adapter(*model, folder + "/cpp_adapter", config);
      } else {
        torchlora::save_adapter(
            *model,
            folder + "/cpp_adapter",
            torchlora::SaveAdapterOptions().adapter_name(
                config.adapter_name()));
      }
    }
    save_tensors(
        folder + "/cpp_output.safetensors", outputs_of(*model, test, inputs));
  }
  export_weight_inits(dir);
  std::cout << "torchlora_interop: exported " << cases().size() << " cases and "
            << weight_init_cases().size() << " inits to " << dir << "\n";
  return 0;
}

int check_files(const std::string& dir, double tolerance) {
  int failures = 0;
  int compared = 0;
  for (const auto& test : cases()) {
    const auto folder = folder_of(dir, test);
    auto model = load_case(test, folder, "peft_adapter");
    const auto inputs =
        torchlora::safetensors::load(folder + "/input.safetensors");
    const auto got = outputs_of(*model, test, inputs);
    const auto peft =
        torchlora::safetensors::load(folder + "/peft_output.safetensors");
    const auto reference =
        torchlora::safetensors::load(folder + "/reference_output.safetensors");
    for (const auto& item : got) {
      const auto to_peft = largest_difference(item.value(), peft[item.key()]);
      const auto to_reference =
          largest_difference(item.value(), reference[item.key()]);
      const bool ok = to_peft <= tolerance && to_reference <= tolerance;
      failures += ok ? 0 : 1;
      ++compared;
      std::cout << "torchlora_interop: peft -> torchlora " << test.name << " "
                << item.key() << ": largest difference to peft " << to_peft
                << ", to the float64 reference " << to_reference
                << (ok ? "" : "  FAILED") << "\n";
    }
  }
  failures += check_weight_inits(dir, compared);
  std::cout << "torchlora_interop: " << compared
            << " outputs of peft's adapters compared, " << failures
            << " failed\n";
  return failures == 0 ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  const std::string command = argc > 1 ? argv[1] : "";
  try {
    if (command == "cases") {
      for (const auto& test : cases()) {
        std::cout << test.name << "\n";
      }
      for (const auto& init : weight_init_cases()) {
        std::cout << init.first << "\n";
      }
      return 0;
    }
    if (argc >= 3 && command == "export") {
      return export_files(argv[2]);
    }
    if (argc >= 3 && command == "check") {
      return check_files(argv[2], argc > 3 ? std::stod(argv[3]) : 1e-9);
    }
  } catch (const c10::Error& error) {
    std::cerr << "torchlora_interop: " << error.what_without_backtrace()
              << "\n";
    return 1;
  } catch (const std::exception& error) {
    std::cerr << "torchlora_interop: " << error.what() << "\n";
    return 1;
  }
  std::cerr << "usage: torchlora_interop export|check DIR [TOLERANCE] | "
               "cases\n";
  return 2;
}
