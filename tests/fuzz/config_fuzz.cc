// config.json and generation_config.json parsing (issue 17).
#include <cstdint>
#include <string>

#include "common/model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string in(reinterpret_cast<const char*>(data), size);
  auto c = kvrelay::model::ParseModelConfig(in, "fuzz/config.json");
  static const std::string kValid =
      R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5})";
  auto valid = kvrelay::model::ParseModelConfig(kValid, "valid/config.json");
  if (!valid.ok()) __builtin_trap();
  kvrelay::model::ModelConfig cfg = c.ok() ? *c : *valid;
  (void)kvrelay::model::ApplyGenerationConfig(in, "fuzz/generation_config.json", &cfg);
  return 0;
}
