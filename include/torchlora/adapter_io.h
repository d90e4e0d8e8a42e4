#pragma once

/// peft's adapter files both ways: `save_adapter` (io/save_adapter.h) and
/// `load_adapter` (io/load_adapter.h).

#include <torchlora/io/load_adapter.h>
#include <torchlora/io/save_adapter.h>
