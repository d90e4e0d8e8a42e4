#pragma once

// The arithmetic of QuantizedLinear's frozen weights: int8 codes with one
// scale per output channel, and QLoRA's 4-bit NormalFloat (NF4) in blocks,
// two codes per byte, optionally with the blocks' scales quantized again.
// Plain tensor ops on any device. Not part of the API.

#include <torch/types.h>

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torchlora {

/// How `QuantizedLinear` stores its frozen weight.
enum class QuantizedFormat {
  /// One int8 code per weight and one scale per output channel
  /// (`scale = max |row| / 127`): 1 byte per weight.
  int8,
  /// QLoRA's 4-bit NormalFloat: blocks of `block_size` weights (in row-major
  /// order), each scaled by its largest magnitude and rounded to the nearest
  /// of 16 values placed at quantiles of a normal distribution; two codes per
  /// byte. 0.5 byte per weight plus the blocks' scales.
  nf4,
};

/// "int8" or "nf4".
inline std::string to_string(QuantizedFormat format) {
  return format == QuantizedFormat::int8 ? "int8" : "nf4";
}

namespace detail {

/// The 16 NF4 values as QLoRA published them (Dettmers et al. 2023,
/// appendix E), ascending: -1, seven negative quantiles, exactly 0, eight
/// positive ones, 1.
inline const std::array<double, 16>& nf4_values() {
  static const std::array<double, 16> values = {
      -1.0,
      -0.6961928009986877,
      -0.5250730514526367,
      -0.39491748809814453,
      -0.28444138169288635,
      -0.18477343022823334,
      -0.09105003625154495,
      0.0,
      0.07958029955625534,
      0.16093020141124725,
      0.24611230194568634,
      0.33791524171829224,
      0.44070982933044434,
      0.5626170039176941,
      0.7229568362236023,
      1.0};
  return values;
}

/// The NF4 values as a tensor `[16]`.
inline torch::Tensor nf4_table(const torch::TensorOptions& options) {
  const auto& values = nf4_values();
  return torch::tensor(std::vector<double>(values.begin(), values.end()))
      .to(options.device(), options.dtype().toScalarType());
}

/// The values of both codes of every byte, `[256, 2]`: the high nibble's
/// value, then the low nibble's. Unpacking is one lookup per byte.
inline torch::Tensor nf4_pair_table(const torch::TensorOptions& options) {
  const auto table = nf4_table(options);
  const auto bytes = torch::arange(256, options.dtype(torch::kLong));
  return torch::stack(
      {table.index_select(0, bytes.div(16, "floor")),
       table.index_select(0, bytes.remainder(16))},
      1);
}

/// Packs 4-bit codes (integers 0..15, an even count) two per byte, the
/// first of each pair in the high nibble.
inline torch::Tensor pack_nibbles(const torch::Tensor& codes) {
  const auto pairs = codes.to(torch::kInt32).reshape({-1, 2});
  return (pairs.select(1, 0) * 16 + pairs.select(1, 1)).to(torch::kUInt8);
}

/// The codes `pack_nibbles` packed, as int64, two per byte.
inline torch::Tensor unpack_nibbles(const torch::Tensor& packed) {
  const auto bytes = packed.to(torch::kLong);
  return torch::stack({bytes.div(16, "floor"), bytes.remainder(16)}, 1)
      .reshape({-1});
}

/// The dtype quantization computes in: float64 for a float64 weight,
/// float32 otherwise.
inline torch::Dtype quantization_dtype(torch::Dtype dtype) {
  return dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
}

/// How many blocks of `block_size` cover `count` weights.
inline int64_t block_count(int64_t count, int64_t block_size) {
  return (count + block_size - 1) / block_size;
}

/// A quantized weight: its codes and the float tensors that scale them, in
/// the order and under the names a module registers them. The float tensors
/// have the dtype the weight is dequantized to.
struct QuantizedTensors {
  std::vector<std::pair<std::string, torch::Tensor>> named;
};

/// int8: `weight` `[out, in]` int8 codes, `weight_scale` `[out]`.
inline QuantizedTensors quantize_int8(
    const torch::Tensor& weight,
    torch::Dtype scale_dtype) {
  torch::NoGradGuard no_grad;
  const auto w = weight.detach().to(quantization_dtype(weight.scalar_type()));
  const auto scale = w.abs().amax({1}) / 127.0;
  const auto safe = torch::where(scale > 0, scale, torch::ones_like(scale));
  const auto codes =
      (w / safe.unsqueeze(1)).round().clamp(-127, 127).to(torch::kInt8);
  return {{{"weight", codes}, {"weight_scale", scale.to(scale_dtype)}}};
}

inline torch::Tensor dequantize_int8(
    const torch::Tensor& codes,
    const torch::Tensor& scale) {
  return codes.to(scale.scalar_type()) * scale.unsqueeze(1);
}

/// The second-level quantization of NF4 block scales ("double
/// quantization"): in groups of 256, the base-2 logarithm of each scale as
/// an int8 code on the group's own range, so that every scale keeps the same
/// relative precision (a linear code would round small scales to nothing
/// next to large ones); -128 marks a block of zeros.
constexpr int64_t kScaleGroup = 256;

/// A value of `t` that bf16 represents exactly: the group constants of
/// double quantization keep their values when a model is cast to bf16 or
/// fp16 later.
inline torch::Tensor bf16_exact(const torch::Tensor& t) {
  return t.to(torch::kBFloat16).to(t.scalar_type());
}

/// The codes of the block scales `absmax` (`[blocks]`, >= 0), each group's
/// smallest logarithm and its step: `absmax = 2^(low + (code + 127) *
/// step)`. `low` and `step` are bf16-exact, and the codes are chosen against
/// them as stored.
inline std::vector<torch::Tensor> quantize_block_scales(
    const torch::Tensor& absmax) {
  const auto count = absmax.numel();
  const auto groups = (count + kScaleGroup - 1) / kScaleGroup;
  const auto zero = absmax == 0;
  // Zero blocks take their group's largest scale meanwhile (and code -128).
  auto padded =
      torch::constant_pad_nd(absmax, {0, groups * kScaleGroup - count})
          .view({groups, kScaleGroup});
  const auto largest = padded.amax({1}, /*keepdim=*/true);
  const auto fill =
      torch::where(largest > 0, largest, torch::ones_like(largest));
  const auto logs = torch::where(padded > 0, padded, fill).log2();
  // `low` rounded to bf16 from one bf16 step below (never above the
  // smallest logarithm) and the step rounded from a little above (never
  // below what the range needs): no scale falls outside the codes, and each
  // is within half a step of its own.
  const auto smallest = logs.amin({1});
  const auto low = bf16_exact(smallest - smallest.abs() / 128);
  const auto step =
      bf16_exact((logs.amax({1}) - low).clamp_min(0) / 254.0 * (1 + 1.0 / 128));
  const auto safe = torch::where(step > 0, step, torch::ones_like(step));
  auto codes = ((logs - low.unsqueeze(1)) / safe.unsqueeze(1))
                   .round()
                   .clamp(0, 254)
                   .sub(127)
                   .reshape({-1})
                   .narrow(0, 0, count);
  codes = torch::where(zero, torch::full_like(codes, -128), codes);
  return {codes.to(torch::kInt8), low, step};
}

/// The block scales from their double quantization, computed in float32
/// (float64 for float64 constants) and returned in `low`'s dtype.
inline torch::Tensor dequantize_block_scales(
    const torch::Tensor& codes,
    const torch::Tensor& low,
    const torch::Tensor& step) {
  const auto dtype = quantization_dtype(low.scalar_type());
  const auto count = codes.numel();
  const auto groups = low.numel();
  const auto c =
      torch::constant_pad_nd(codes.to(dtype), {0, groups * kScaleGroup - count})
          .view({groups, kScaleGroup});
  const auto scales = torch::exp2(
      low.to(dtype).unsqueeze(1) + (c + 127) * step.to(dtype).unsqueeze(1));
  return torch::where(c == -128, torch::zeros_like(scales), scales)
      .reshape({-1})
      .narrow(0, 0, count)
      .to(low.scalar_type());
}

/// NF4 codes of `weight` (flattened, zero-padded to whole blocks): each
/// block divided by `absmax` (its largest magnitude, or the value double
/// quantization gives back for it) and rounded to the nearest NF4 value.
inline torch::Tensor nf4_codes(
    const torch::Tensor& blocks,
    const torch::Tensor& absmax) {
  const auto safe = torch::where(absmax != 0, absmax, torch::ones_like(absmax));
  const auto normalized = (blocks / safe.unsqueeze(1)).clamp(-1, 1);
  const auto table = nf4_table(blocks.options());
  // Midpoints between neighbouring values: a value on a midpoint takes the
  // lower code.
  const auto midpoints =
      (table.narrow(0, 0, 15) + table.narrow(0, 1, 15)).div(2).contiguous();
  return torch::bucketize(normalized.contiguous(), midpoints);
}

/// nf4: `weight` `[blocks * block_size / 2]` uint8 (two codes per byte) and
/// either `weight_absmax` `[blocks]` or, double-quantized,
/// `weight_absmax` int8 codes with `weight_absmax_low` and
/// `weight_absmax_step` `[ceil(blocks / 256)]`.
inline QuantizedTensors quantize_nf4(
    const torch::Tensor& weight,
    int64_t block_size,
    bool double_quant,
    torch::Dtype scale_dtype) {
  torch::NoGradGuard no_grad;
  const auto w = weight.detach().to(quantization_dtype(weight.scalar_type()));
  const auto count = w.numel();
  const auto blocks = block_count(count, block_size);
  const auto padded =
      torch::constant_pad_nd(w.reshape({-1}), {0, blocks * block_size - count})
          .view({blocks, block_size});
  const auto absmax = padded.abs().amax({1});
  QuantizedTensors result;
  if (double_quant) {
    auto parts = quantize_block_scales(absmax);
    // The codes are chosen against the scales as they will be read back:
    // from the constants in the stored dtype, computed in float32.
    const auto restored =
        dequantize_block_scales(
            parts[0], parts[1].to(scale_dtype), parts[2].to(scale_dtype))
            .to(absmax.scalar_type());
    result.named = {
        {"weight", pack_nibbles(nf4_codes(padded, restored))},
        {"weight_absmax", parts[0]},
        {"weight_absmax_low", parts[1].to(scale_dtype)},
        {"weight_absmax_step", parts[2].to(scale_dtype)}};
  } else {
    const auto stored = absmax.to(scale_dtype);
    result.named = {
        {"weight",
         pack_nibbles(nf4_codes(padded, stored.to(absmax.scalar_type())))},
        {"weight_absmax", stored}};
  }
  return result;
}

/// The weight `[out, in]` that NF4 `packed` codes and their block scales
/// `absmax` (in the dtype to compute in) stand for.
inline torch::Tensor dequantize_nf4(
    const torch::Tensor& packed,
    const torch::Tensor& absmax,
    int64_t out,
    int64_t in,
    int64_t block_size) {
  const auto pairs = nf4_pair_table(absmax.options());
  const auto bytes = packed.to(torch::kLong);
  // Each pair of values read as one integer of their size: a gather of
  // single elements, about 3x faster on the CPU than of 2-element rows
  // (float32 at 1024 x 1024: 0.24 against 0.89 ms). float64 pairs have no
  // such integer.
  const auto pair_bytes = 2 * pairs.element_size();
  torch::Tensor values;
  if (pair_bytes == 8 || pair_bytes == 4) {
    const auto as_integers =
        pairs.view(pair_bytes == 8 ? torch::kInt64 : torch::kInt32).view(-1);
    values = as_integers.index_select(0, bytes).view(pairs.scalar_type());
  } else {
    values = pairs.index_select(0, bytes);
  }
  return values.view({absmax.numel(), block_size})
      .mul_(absmax.unsqueeze(1))
      .view({-1})
      .narrow(0, 0, out * in)
      .view({out, in});
}

/// A quantized weight as a dequantization reads it: its format, its shape
/// `[out, in]`, its NF4 block size and its tensors in registration order
/// (int8: codes, scales; nf4: packed codes, block scales; double-quantized
/// nf4: packed codes, scale codes, their groups' lowest logarithm and step).
struct QuantizedWeightRef {
  QuantizedFormat format;
  int64_t out;
  int64_t in;
  int64_t block_size;
  std::vector<torch::Tensor> tensors;
};

/// The float weight `[out, in]` that `ref` stands for, in the dtype of its
/// float tensors.
inline torch::Tensor dequantize(const QuantizedWeightRef& ref) {
  const auto& t = ref.tensors;
  if (ref.format == QuantizedFormat::int8) {
    return dequantize_int8(t[0], t[1]);
  }
  const auto absmax =
      t.size() == 4 ? dequantize_block_scales(t[1], t[2], t[3]) : t[1];
  return dequantize_nf4(t[0], absmax, ref.out, ref.in, ref.block_size);
}

} // namespace detail
} // namespace torchlora
