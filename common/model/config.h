// Model configuration read from a Hugging Face model folder:
// config.json (+ generation_config.json when present).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace kvrelay::model {

enum class Family { kLlama, kGpt2 };

const char* FamilyName(Family f);  // "llama" / "gpt2"

struct RopeScaling {
  // Only "llama3" scaling is supported (others are rejected with INVALID_ARGUMENT).
  bool llama3 = false;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;
  float high_freq_factor = 4.0f;
  int original_max_position_embeddings = 8192;
};

struct ModelConfig {
  Family family = Family::kLlama;
  std::string model_type;  // "llama", "mistral", "qwen2", "gpt2" (as in config.json)
  int vocab_size = 0;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;       // == num_heads for MHA and for GPT-2
  int head_dim = 0;           // hidden_size / num_heads unless config.json says "head_dim"
  int intermediate_size = 0;  // GPT-2: n_inner or 4 * n_embd
  int max_position_embeddings = 0;
  float norm_eps = 1e-5f;  // rms_norm_eps / layer_norm_epsilon
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;  // GPT-2: always true
  bool attention_bias = false;       // q/k/v biases (qwen2: true; GPT-2: true, plus o bias)
  bool mlp_bias = false;             // llama "mlp_bias"; GPT-2: true
  std::string hidden_act;            // "silu" (llama) / "gelu_new" etc (gpt2)
  std::string torch_dtype;           // informational
  int bos_token_id = -1;
  std::vector<int> eos_token_ids;  // generation_config.json wins over config.json
};

// Parses config.json text. `path` is used only in error messages.
// Errors: INVALID_ARGUMENT "<path>: <what>" for malformed JSON, missing or
// inconsistent fields, unsupported model_type.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text, const std::string& path);

// Applies generation_config.json text (eos_token_id int or list, bos_token_id).
absl::Status ApplyGenerationConfig(const std::string& json_text, const std::string& path,
                                   ModelConfig* config);

// Reads <dir>/config.json and, when present, <dir>/generation_config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

// Serialises a config back to HF config.json text (used by make-model).
std::string ModelConfigToJson(const ModelConfig& config);
// generation_config.json text for a config (bos/eos ids).
std::string GenerationConfigToJson(const ModelConfig& config);

}  // namespace kvrelay::model
