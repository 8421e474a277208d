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

}  // namespace kvrelay::kernels::math
