#pragma once
// The worker side of torchlora_distributed_tests (distributed_worker.cpp).

#include <string>
#include <vector>

namespace torchlora_test {

/// Runs one worker mode (train, die, stall, mismatch) with its arguments;
/// returns the process's exit status.
int run_worker(const std::vector<std::string>& args);

} // namespace torchlora_test
