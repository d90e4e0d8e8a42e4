// Built by the packaging test against an installed or added torchlora.
#include <torchlora/torchlora.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  torch::nn::Linear base(8, 4);
  torchlora::LoRALinear layer(base, torchlora::LoRAOptions(2).alpha(4));
  const auto x = torch::randn({3, 8});
  if (!torch::equal(layer(x), base(x))) {
    std::cerr << "consumer: a fresh adapter changed the output\n";
    return 1;
  }
  const auto counts = torchlora::count_parameters(*layer);
  std::cout << "consumer: ok, torchlora " << TORCHLORA_VERSION_MAJOR << "."
            << TORCHLORA_VERSION_MINOR << "." << TORCHLORA_VERSION_PATCH << ", "
            << counts.trainable << " of " << counts.total
            << " parameters trainable\n";
  return 0;
}
