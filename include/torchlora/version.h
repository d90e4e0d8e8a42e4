#pragma once

/// torchlora's version, as `major * 10000 + minor * 100 + patch`.
#define TORCHLORA_VERSION_MAJOR 0
#define TORCHLORA_VERSION_MINOR 1
#define TORCHLORA_VERSION_PATCH 0
#define TORCHLORA_VERSION                                            \
  (TORCHLORA_VERSION_MAJOR * 10000 + TORCHLORA_VERSION_MINOR * 100 + \
   TORCHLORA_VERSION_PATCH)
