// Model weights mapped from a WeightStore into the layout the forward pass uses.
// Linear weights are row-major [out][in] in their stored dtype (f32/f16/bf16);
// Llama q/k/v and gate/up projections are fused into one matrix each, GPT-2's
// Conv1D weights ([in][out]) are transposed. Norm weights and biases become f32.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/model/config.h"
#include "common/model/safetensors.h"
#include "kernels/dtype.h"

namespace kvrelay::model {

struct Linear {
  kernels::DType dtype = kernels::DType::kF32;
  const void* w = nullptr;  // [out][in]
  int64_t out = 0;
  int64_t in = 0;
  const float* bias = nullptr;  // [out] or null
};

struct LayerWeights {
  std::vector<float> norm1_w, norm1_b;  // input (attention) norm; _b only for LayerNorm
  std::vector<float> norm2_w, norm2_b;  // post-attention (MLP) norm
  Linear qkv;  // [(heads + 2 * kv_heads) * head_dim][hidden]: q rows, then k, then v
  Linear o;    // [hidden][heads * head_dim]
  Linear up;  // Llama: gate then up, [2 * intermediate][hidden]; GPT-2: c_fc [intermediate][hidden]
  Linear down;  // [hidden][intermediate]
};

struct Weights {
  kernels::DType embed_dtype = kernels::DType::kF32;
  const void* embed = nullptr;   // [vocab][hidden]
  std::vector<float> pos_embed;  // GPT-2 learned positions [max_pos][hidden]
  std::vector<float> final_norm_w, final_norm_b;
  Linear lm_head;  // tied: points at the embedding
  std::vector<LayerWeights> layers;
  int64_t parameter_count = 0;
  int64_t parameter_bytes = 0;  // bytes of weights as used (after fusing/transposing)

  // Keeps mapped files and converted buffers alive.
  std::unique_ptr<WeightStore> store;
  std::vector<std::unique_ptr<std::vector<uint8_t>>> owned;
  std::vector<std::unique_ptr<std::vector<float>>> owned_f32;
};

// Loads and validates every tensor against the config (shape errors name the file and tensor).
absl::StatusOr<std::unique_ptr<Weights>> LoadWeights(const ModelConfig& config,
                                                     std::unique_ptr<WeightStore> store);

}  // namespace kvrelay::model
