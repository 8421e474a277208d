// Writes a small random-weight Hugging Face model folder (config.json,
// generation_config.json, model.safetensors, tokenizer.json) from a seed: the
// tests' fixture and the embedded demo model. Same options, same bytes.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "common/model/config.h"
#include "kernels/dtype.h"

namespace kvrelay::model {

struct MakeModelOptions {
  Family family = Family::kLlama;
  std::string model_type;  // llama family: "llama" (default), "mistral" or "qwen2" (q/k/v bias)
  uint64_t seed = 0;
  int layers = 2;
  int hidden = 64;
  int heads = 4;
  int kv_heads = 2;      // llama family; GPT-2 always uses heads
  int intermediate = 0;  // 0: llama 2 * hidden rounded to 16... gpt2 4 * hidden
  int vocab = 512;       // model vocab; the tokenizer is trained up to it
  int max_pos = 2048;
  bool tie_embeddings = false;  // llama family (GPT-2 is always tied)
  bool rope_llama3 = false;     // llama-3 rope scaling (factor 8, original ctx max_pos / 4)
  kernels::DType dtype = kernels::DType::kF32;  // weights: f32, f16 or bf16
  float init_std = 0.02f;
};

// Fills in defaults and checks the options (INVALID_ARGUMENT naming the option).
absl::StatusOr<ModelConfig> ConfigFor(const MakeModelOptions& options, int bos_token_id,
                                      std::vector<int> eos_token_ids);

// Creates `out_dir` (and parents) and writes the four files.
absl::Status MakeModel(const MakeModelOptions& options, const std::string& out_dir);

}  // namespace kvrelay::model
