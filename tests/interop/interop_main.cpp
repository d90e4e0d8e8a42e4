// The C++ side of the peft interop check (tests/interop/peft_interop.py).
//
//   torchlora_interop export DIR  writes DIR/base.safetensors (base weights),
//                                 DIR/input.safetensors, an adapter saved with
//                                 save_adapter in DIR/cpp_adapter, and the
//                                 adapted output in DIR/cpp_output.safetensors
//   torchlora_interop check DIR   loads DIR/peft_adapter (saved by Python peft)
//                                 into the base model and compares its output
//                                 with DIR/peft_output.safetensors
#include <torchlora/torchlora.h>

#include <iostream>
#include <string>

namespace {

/// The test model; tests/interop/peft_interop.py builds its Python twin.
/// Its typed members are torchlora layers built from plain options, so that
/// inject_lora can adapt them: Linear, Embedding and Conv2d layers. Its
/// MultiheadAttention stays LibTorch's own (inject_lora binds its members).
struct TinyNetImpl : torch::nn::Module {
  TinyNetImpl() {
    embed = register_module(
        "embed", torchlora::LoRAEmbedding(torch::nn::EmbeddingOptions(10, 16)));
    conv = register_module(
        "conv",
        torchlora::LoRAConv2d(torch::nn::Conv2dOptions(3, 4, 3).padding(1)));
    q_proj = register_module("q_proj", torchlora::LoRALinear(16, 16));
    v_proj = register_module("v_proj", torchlora::LoRALinear(16, 16));
    mlp = register_module(
        "mlp",
        torch::nn::Sequential(
            torch::nn::Linear(16, 32),
            torch::nn::ReLU(),
            torch::nn::Linear(32, 16)));
    head = register_module("head", torchlora::LoRALinear(16, 4));
    attn = register_module(
        "attn",
        torch::nn::MultiheadAttention(
            torch::nn::MultiheadAttentionOptions(16, 2)));
  }
  /// `x` `[N, 16]`, `tokens` `[N]` (0..9), `image` `[N, 3, H, W]`.
  torch::Tensor forward(
      const torch::Tensor& x,
      const torch::Tensor& tokens,
      const torch::Tensor& image) {
    const auto sequence = x.unsqueeze(0); // one position, N in the batch
    const auto attended =
        std::get<0>(attn(sequence, sequence, sequence)).squeeze(0);
    return head(
               mlp->forward(q_proj(x) + v_proj(x) + embed(tokens) + attended)) +
        conv(image).mean({2, 3});
  }
  torchlora::LoRAEmbedding embed{nullptr};
  torchlora::LoRAConv2d conv{nullptr};
  torchlora::LoRALinear q_proj{nullptr}, v_proj{nullptr}, head{nullptr};
  torch::nn::Sequential mlp{nullptr};
  torch::nn::MultiheadAttention attn{nullptr};
};
TORCH_MODULE(TinyNet);

void load_base(TinyNet& model, const std::string& dir) {
  const auto tensors = torchlora::safetensors::load(dir + "/base.safetensors");
  torch::NoGradGuard no_grad;
  for (auto& item : model->named_parameters()) {
    item.value().copy_(tensors[item.key()]);
  }
}

torch::Tensor single(const std::string& path, const std::string& name) {
  return torchlora::safetensors::load(path)[name];
}

/// The model's output on the inputs in DIR/input.safetensors.
torch::Tensor output_on_inputs(TinyNet& model, const std::string& dir) {
  const auto inputs = torchlora::safetensors::load(dir + "/input.safetensors");
  model->eval();
  torch::NoGradGuard no_grad;
  torchlora::AdaptedWeights adapted(*model);
  return model(inputs["x"], inputs["tokens"], inputs["image"]);
}

int export_files(const std::string& dir) {
  torch::manual_seed(0);
  TinyNet model;
  torchlora::safetensors::Tensors base;
  for (const auto& item : model->named_parameters()) {
    base.insert(item.key(), item.value().detach());
  }
  torchlora::safetensors::save(dir + "/base.safetensors", base);
  torchlora::safetensors::Tensors input;
  input.insert("x", torch::randn({5, 16}));
  input.insert("tokens", torch::tensor({0, 3, 9, 3, 7}, torch::kInt64));
  input.insert("image", torch::randn({5, 3, 6, 6}));
  torchlora::safetensors::save(dir + "/input.safetensors", input);

  torchlora::inject_lora(
      model,
      torchlora::LoRAConfig(4)
          .alpha(8)
          .init(torchlora::LoRAInit::random)
          .target_modules(
              {"q_proj", "v_proj", "mlp.0", "head", "embed", "conv", "attn"})
          .rank_pattern({{"head", 2}})
          .alpha_pattern({{"mlp.0", 16.0}}));
  {
    // peft (up to 0.18 at least, huggingface/peft#3774) adds an attention's
    // out_proj delta twice; a zero B keeps the outputs comparable, while
    // the in_proj adapter and every key are checked in full.
    torch::NoGradGuard no_grad;
    model->named_parameters()["attn.out_proj.lora_B.default.weight"].zero_();
  }
  torchlora::save_adapter(*model, dir + "/cpp_adapter");
  torchlora::safetensors::Tensors output;
  output.insert("y", output_on_inputs(model, dir));
  torchlora::safetensors::save(dir + "/cpp_output.safetensors", output);
  std::cout
      << "torchlora_interop: exported base weights, input, adapter and output to "
      << dir << "\n";
  return 0;
}

int check_files(const std::string& dir, double tolerance) {
  TinyNet model;
  load_base(model, dir);
  torchlora::load_adapter(*model, dir + "/peft_adapter");
  const auto expected = single(dir + "/peft_output.safetensors", "y");
  const auto difference =
      (output_on_inputs(model, dir) - expected).abs().max().item<double>();
  std::cout
      << "torchlora_interop: peft adapter loaded in C++, largest output difference "
      << difference << "\n";
  return difference <= tolerance ? 0 : 1;
}

} // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: torchlora_interop export|check DIR [TOLERANCE]\n";
    return 2;
  }
  const std::string command = argv[1];
  const std::string dir = argv[2];
  try {
    if (command == "export") {
      return export_files(dir);
    }
    if (command == "check") {
      return check_files(dir, argc > 3 ? std::stod(argv[3]) : 1e-5);
    }
  } catch (const std::exception& error) {
    std::cerr << "torchlora_interop: " << error.what() << "\n";
    return 1;
  }
  std::cerr << "torchlora_interop: unknown command " << command << "\n";
  return 2;
}
