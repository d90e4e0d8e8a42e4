#pragma once

// The checks behind every torchlora error and warning: the "torchlora: "
// prefix is written here once. Not part of the API.

#include <c10/util/Exception.h>

/// What every torchlora message starts with (a string literal, so that it
/// joins the literal after it).
#define TORCHLORA_PREFIX "torchlora: "

/// `TORCH_CHECK` with the prefix: a `c10::Error` whose text starts with it.
#define TORCHLORA_CHECK(cond, ...) \
  TORCH_CHECK(cond, TORCHLORA_PREFIX, __VA_ARGS__)

/// `TORCH_WARN` with the prefix.
#define TORCHLORA_WARN(...) TORCH_WARN(TORCHLORA_PREFIX, __VA_ARGS__)

/// `TORCH_WARN_ONCE` with the prefix.
#define TORCHLORA_WARN_ONCE(...) TORCH_WARN_ONCE(TORCHLORA_PREFIX, __VA_ARGS__)

/// `TORCH_INTERNAL_ASSERT` with the prefix: a broken invariant of
/// torchlora itself, not a user error.
#define TORCHLORA_INTERNAL_ASSERT(cond, ...) \
  TORCH_INTERNAL_ASSERT(cond, TORCHLORA_PREFIX, __VA_ARGS__)

/// The ending of an error that left everything as it was.
#define TORCHLORA_NOTHING_CHANGED " Nothing was changed."
