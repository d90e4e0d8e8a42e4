// Wraps one Linear layer with a LoRA adapter, shows what that changes and
// trains the adapter for a few steps on a toy target.
//
//   build/default/examples/wrap_layer
#include <torchlora/torchlora.h>

#include <iomanip>
#include <iostream>

int main() {
  torch::manual_seed(0);
  const int64_t in = 256;
  const int64_t out = 128;

  // A "pretrained" layer, and the LoRA layer that wraps it: the base tensors
  // are shared, not copied, and frozen.
  torch::nn::Linear base(in, out);
  torchlora::LoRALinear layer(base, torchlora::LoRAOptions(8).alpha(16));
  std::cout << "wrapped: " << *layer << "\n";
  std::cout << "shares the base weight: " << std::boolalpha
            << (layer->weight.data_ptr() == base->weight.data_ptr()) << "\n";

  const auto counts = torchlora::count_parameters(*layer);
  std::cout << "trainable parameters: " << counts.trainable << " of "
            << counts.total << " (" << std::fixed << std::setprecision(2)
            << 100.0 * counts.trainable / counts.total << "%)\n";

  // A fresh adapter changes nothing (B starts at zero).
  const auto x = torch::randn({64, in});
  const bool unchanged_at_start = torch::equal(layer(x), base(x));
  std::cout << "fresh adapter leaves the output unchanged: "
            << unchanged_at_start << "\n";

  // Teach the adapter a low-rank change of the layer.
  const auto change = torch::randn({out, 4}).mm(torch::randn({4, in})) * 0.05;
  const auto target = base(x).detach() + x.mm(change.t());
  const auto base_weight_before = base->weight.detach().clone();
  torch::optim::Adam optimizer(
      layer->parameters(), torch::optim::AdamOptions(1e-2));
  auto loss_of = [&] { return torch::mse_loss(layer(x), target); };
  std::cout << "before training: loss " << std::setprecision(5)
            << loss_of().item<double>() << "\n";
  for (int step = 0; step < 200; ++step) {
    optimizer.zero_grad();
    auto loss = loss_of();
    loss.backward();
    optimizer.step();
  }
  const double final_loss = loss_of().item<double>();
  std::cout << "after training: loss " << final_loss << "\n";
  const bool untouched = torch::equal(base->weight, base_weight_before);
  std::cout << "base weight untouched by training: " << untouched << "\n";
  const bool shares = layer->weight.data_ptr() == base->weight.data_ptr();
  // Everything printed above is what this program claims: check it.
  return unchanged_at_start && shares && untouched && final_loss < 1e-3 ? 0 : 1;
}
