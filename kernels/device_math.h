// Per-element arithmetic shared by the CPU ops (kernels/cpu/) and the CUDA kernels
// (kernels/cuda/): each function is the exact sequence of float/double operations one
// output element goes through, so the scalar CPU path — and every CPU test — runs the
// arithmetic the GPU runs. Reductions (sums of squares, means, max) are not here: their
// order is each backend's own (sequential on the CPU, a fixed tree on the GPU) and is
// stated where they are implemented.
//
// Rules for this file:
//  - KVR_HD functions only (host and device); no allocation, no loops over rows.
//  - Keep each expression exactly as written: the CPU promises bit-identical results across
//    ISAs and batch shapes, and reordering (a * b) * c into a * (b * c) changes bits.
//  - The CUDA files that use these are compiled with --fmad=false, so nvcc does not contract
//    a * b + c into one fma either; transcendental functions (exp, tanh, erf, sin, cos, pow)
//    are the libm ones on the CPU and CUDA's (within 2 ulp) on the GPU.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KVR_HD __host__ __device__ inline
#else
#define KVR_HD inline
#endif

// In their own namespace: several share a name with the array op they are the body of
// (kernels::SiluMul over rows, math::SiluMul of one element).
namespace kvrelay::kernels::math {

// ---- RMSNorm: y = x * (1 / sqrt(mean(x^2) + eps)) * w ----

// One term of the sum of squares, accumulated in double.
KVR_HD double RmsNormSquare(float x) { return static_cast<double>(x) * x; }
// 1 / rms from the double sum of squares of `dim` elements.
KVR_HD float RmsNormInvRms(double sum_sq, int64_t dim, float eps) {
  return static_cast<float>(1.0 / std::sqrt(sum_sq / dim + eps));
}
KVR_HD float RmsNormApply(float x, float inv_rms, float w) { return (x * inv_rms) * w; }

// ---- LayerNorm: y = (x - mean) / sqrt(var + eps) * w + b (biased variance) ----

// One term of the variance sum, around the double mean, accumulated in double.
KVR_HD double LayerNormSquaredDeviation(float x, double mean) { return (x - mean) * (x - mean); }
// 1 / std from the (already divided by dim) double variance.
KVR_HD float LayerNormInvStd(double var, float eps) {
  return static_cast<float>(1.0 / std::sqrt(var + eps));
}
// `mean` is the double mean rounded to float.
KVR_HD float LayerNormApply(float x, float mean, float inv_std, float w, float b) {
  return (x - mean) * inv_std * w + b;
}

// ---- Activations ----

// silu(g) * u: SwiGLU's gate times up.
KVR_HD float SiluMul(float g, float u) { return g / (1.0f + std::exp(-g)) * u; }
// GPT-2 "gelu_new": 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
KVR_HD float GeluTanh(float v) {
  constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * v * (1.0f + std::tanh(kC * (v + 0.044715f * v * v * v)));
}
// Exact GELU (HF "gelu"): 0.5 x (1 + erf(x / sqrt 2)).
KVR_HD float GeluErf(float x) {
  constexpr float kInvSqrt2 = 0.7071067811865476f;
  return 0.5f * x * (1.0f + std::erf(x * kInvSqrt2));
}

// ---- RoPE (rotate-half convention, as HF Llama) ----

// HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), in float, for pair i < head_dim / 2.
KVR_HD float RopeBaseInvFreq(int i, int head_dim, float theta) {
  const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
  return 1.0f / std::pow(theta, expo);
}

// Llama-3 "rope_scaling" of one inverse frequency (transformers'
// _compute_llama3_parameters, in float): high frequencies unchanged, low ones divided by
// `factor`, a smooth blend in between.
KVR_HD float Llama3ScaleInvFreq(float inv_freq, float factor, float low_freq_factor,
                                float high_freq_factor, int original_max_position_embeddings) {
  const float old_ctx = static_cast<float>(original_max_position_embeddings);
  const float low_wavelen = old_ctx / low_freq_factor;
  const float high_wavelen = old_ctx / high_freq_factor;
  // static_cast<float>(M_PI), spelled out: M_PI is not standard C++.
  const float wavelen = 2.0f * static_cast<float>(3.14159265358979323846) / inv_freq;
  if (wavelen < high_wavelen) return inv_freq;
  if (wavelen > low_wavelen) return inv_freq / factor;
  const float smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
  return (1.0f - smooth) * inv_freq / factor + smooth * inv_freq;
}

// Angle of pair i at a position (the caller converts the int64 position to float once).
KVR_HD float RopeAngle(float position, float inv_freq) { return position * inv_freq; }

// Rotates the pair (a, b) = (x[i], x[i + head_dim / 2]) by the angle with cosine c, sine s.
KVR_HD void RopeRotatePair(float a, float b, float c, float s, float* out_a, float* out_b) {
  *out_a = a * c - b * s;
  *out_b = b * c + a * s;
}

// ---- int8 KV (one scale per token per kv head, symmetric, 127 levels each side) ----
//
// Writing a row: amax = fold of I8KvAbsMaxStep over the row from 0 (max is exact, so any
// order gives the same value), s = I8KvScale(amax), q[i] = I8KvQuantize(x[i], s).
// Reading: I8KvDequantize(q) is the raw value; the row's scale is applied once to the result
// of the dot product with it (score = dot(q, k_raw) * s_k) and folded into the softmax
// weight for V (w = p * s_v), never per element.

// Finite values only: +-inf saturate to +-127 and NaN stores 0, so they must not set the scale.
KVR_HD float I8KvAbsMaxStep(float amax, float x) {
  if (!std::isfinite(x)) return amax;
  const float a = std::fabs(x);
  return amax < a ? a : amax;  // std::max(amax, a)
}
KVR_HD float I8KvScale(float amax) { return amax > 0.0f ? amax / 127.0f : 1.0f; }
// Divides rather than multiplying by 1/s: for tiny amax (< ~3.7e-37) 1/s overflows to inf,
// which would turn every nonzero element into +-127 and zeros into NaN. A NaN never reaches
// the int8 conversion (which would be undefined).
KVR_HD int8_t I8KvQuantize(float x, float scale) {
  const float q = std::isnan(x) ? 0.0f : std::nearbyint(x / scale);
  // std::clamp(q, -127.0f, 127.0f)
  const float c = q < -127.0f ? -127.0f : (127.0f < q ? 127.0f : q);
  return static_cast<int8_t>(c);
}
KVR_HD float I8KvDequantize(int8_t q) { return static_cast<float>(q); }

// ---- Token sampling (common/sampling/sampler.cc and kernels/cuda/sampling.cu) ----
//
// The per-token arithmetic of the sampler: penalties, tempered probabilities, the filter
// thresholds and the seeded uniform draw. Sums over the vocabulary are not here (the CPU
// sums in token-id order; the GPU kernel runs the same sequential sums, see sampling.cu).

// NaN logits are treated as -inf: they can never win and never poison a sum.
KVR_HD float SampleSanitize(float logit) { return std::isnan(logit) ? -INFINITY : logit; }

// Repetition penalty (HF / vLLM) of a token seen in the prompt or the output: positive
// logits are divided by the penalty, the others multiplied.
KVR_HD float ApplyRepetitionPenalty(float logit, float penalty) {
  return logit > 0.0f ? logit / penalty : logit * penalty;
}

// Frequency and presence penalties (OpenAI) of a token seen `count` > 0 times in the output.
KVR_HD float ApplyOutputPenalties(float logit, float count, float frequency, float presence) {
  logit -= frequency * count;
  logit -= presence;
  return logit;
}

// Unnormalised tempered probability exp((logit - max) / temperature), as float: exactly 1 for
// the max itself (also when the max is +-inf), 0 when it underflows. exp is double precision
// (libm on the CPU, CUDA's exp within 1 ulp on the GPU).
KVR_HD float SampleRelativeProb(float logit, float max_logit, double temperature) {
  if (logit == max_logit) return 1.0f;
  return static_cast<float>(
      std::exp((static_cast<double>(logit) - static_cast<double>(max_logit)) / temperature));
}

// Top-p keeps the shortest best-first prefix whose cumulative mass reaches this.
KVR_HD double TopPThreshold(float top_p, double total_mass) {
  return static_cast<double>(top_p) * total_mass;
}
// Min-p drops candidates whose probability is below this.
KVR_HD float MinPThreshold(float min_p, float max_p) { return min_p * max_p; }
// The inverse-CDF draw picks the first best-first candidate whose cumulative mass exceeds this.
KVR_HD double DrawTarget(double u, double total_mass) { return u * total_mass; }

// Log-softmax of raw logits: logprob(x) = LogSoftmaxValue(LogSoftmaxShift(x, max), log(sum_i
// exp(LogSoftmaxShift(x_i, max)))). The shift is exactly 0 for the max itself (also +-inf).
KVR_HD double LogSoftmaxShift(float x, float max_logit) {
  return x == max_logit ? 0.0 : static_cast<double>(x) - static_cast<double>(max_logit);
}
KVR_HD float LogSoftmaxValue(double shifted, double log_sum) {
  return static_cast<float>(shifted - log_sum);
}

// The seeded randomness: XXH3_64bits_withSeed (xxHash 0.8, frozen output) of the 8
// little-endian bytes of `value`, i.e. XXH3's 4-to-8-byte path for len == 8 with the default
// secret, written out so the GPU runs it too. Integer arithmetic only: bit-identical.
KVR_HD uint64_t Xxh3Rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
KVR_HD uint64_t Xxh3Seeded8Bytes(uint64_t value, uint64_t seed) {
  // XXH_readLE64(kSecret + 8) ^ XXH_readLE64(kSecret + 16).
  constexpr uint64_t kSecret8 = 0x1cad21f72c81017cULL;
  constexpr uint64_t kSecret16 = 0xdb979083e96dd4deULL;
  constexpr uint64_t kMx2 = 0x9FB21C651E98DF25ULL;
  const auto seed32 = static_cast<uint32_t>(seed);
  const uint32_t swapped = (seed32 << 24) | ((seed32 << 8) & 0x00ff0000u) |
                           ((seed32 >> 8) & 0x0000ff00u) | (seed32 >> 24);
  seed ^= static_cast<uint64_t>(swapped) << 32;
  const uint64_t input1 = value & 0xffffffffULL;  // XXH_readLE32(input)
  const uint64_t input2 = value >> 32;            // XXH_readLE32(input + len - 4)
  const uint64_t bitflip = (kSecret8 ^ kSecret16) - seed;
  uint64_t h = (input2 + (input1 << 32)) ^ bitflip;
  // XXH3_rrmxmx(h, len = 8)
  h ^= Xxh3Rotl64(h, 49) ^ Xxh3Rotl64(h, 24);
  h *= kMx2;
  h ^= (h >> 35) + 8;
  h *= kMx2;
  return h ^ (h >> 28);
}

// A uniform double in [0, 1) from (seed, position): the top 53 bits of the hash of the
// position's 8 little-endian bytes, seeded with `seed` (sampling::UniformForPosition).
KVR_HD double SampleUniform(uint64_t seed, int64_t position) {
  const uint64_t hash = Xxh3Seeded8Bytes(static_cast<uint64_t>(position), seed);
  return static_cast<double>(hash >> 11) * 0x1.0p-53;
}

}  // namespace kvrelay::kernels::math
