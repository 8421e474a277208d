#include "common/model/config.h"

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::model {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

using testing::ScopedTempDir;

constexpr const char* kPath = "/models/x/config.json";

// TinyLlama-1.1B-style config with GQA; tied and llama3 variants are built from it.
std::string LlamaJson(const std::string& extra = "") {
  return std::string(R"({
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2)") +
         extra + "}";
}

void ExpectSameConfig(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.num_layers, b.num_layers);
  EXPECT_EQ(a.num_heads, b.num_heads);
  EXPECT_EQ(a.num_kv_heads, b.num_kv_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.norm_eps, b.norm_eps);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.rope_scaling.llama3, b.rope_scaling.llama3);
  EXPECT_EQ(a.rope_scaling.factor, b.rope_scaling.factor);
  EXPECT_EQ(a.rope_scaling.low_freq_factor, b.rope_scaling.low_freq_factor);
  EXPECT_EQ(a.rope_scaling.high_freq_factor, b.rope_scaling.high_freq_factor);
  EXPECT_EQ(a.rope_scaling.original_max_position_embeddings,
            b.rope_scaling.original_max_position_embeddings);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.hidden_act, b.hidden_act);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
}

TEST(ConfigTest, ParsesLlamaWithGqa) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(LlamaJson(), kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, Family::kLlama);
  EXPECT_STREQ(FamilyName(c->family), "llama");
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->vocab_size, 32000);
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->num_layers, 22);
  EXPECT_EQ(c->num_heads, 32);
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->intermediate_size, 5632);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_FLOAT_EQ(c->norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FALSE(c->rope_scaling.llama3);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_EQ(c->hidden_act, "silu");
  EXPECT_EQ(c->torch_dtype, "bfloat16");
  EXPECT_EQ(c->bos_token_id, 1);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
}

TEST(ConfigTest, ParsesLlama3RopeScalingTiedAndEosList) {
  // Llama-3.2-1B style.
  const std::string json = R"({
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false,
    "hidden_act": "silu", "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009]})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_FLOAT_EQ(c->rope_theta, 500000.0f);
  EXPECT_TRUE(c->rope_scaling.llama3);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 32.0f);
  EXPECT_FLOAT_EQ(c->rope_scaling.low_freq_factor, 1.0f);
  EXPECT_FLOAT_EQ(c->rope_scaling.high_freq_factor, 4.0f);
  EXPECT_EQ(c->rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->bos_token_id, 128000);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(128001, 128008, 128009));
}

TEST(ConfigTest, AcceptsLegacyRopeScalingTypeKeyAndExplicitHeadDim) {
  const std::string json = LlamaJson(R"(,
    "head_dim": 128,
    "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})");
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->head_dim, 128);  // explicit head_dim wins over hidden / heads
  EXPECT_TRUE(c->rope_scaling.llama3);
  EXPECT_FLOAT_EQ(c->rope_scaling.factor, 8.0f);
}

TEST(ConfigTest, ParsesMistral) {
  const std::string json = R"({
    "architectures": ["MistralForCausalLM"], "model_type": "mistral",
    "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "sliding_window": null, "tie_word_embeddings": false, "hidden_act": "silu",
    "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, Family::kLlama);
  EXPECT_EQ(c->model_type, "mistral");
  EXPECT_EQ(c->num_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_FALSE(c->attention_bias);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));
}

TEST(ConfigTest, SlidingWindowClampsTheContext) {
  // Mistral v0.1: a 4096-token window; full attention is exact up to it.
  const std::string json = R"({"model_type": "mistral", "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 32768, "sliding_window": 4096})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_position_embeddings, 4096);
  // Qwen2 ignores sliding_window unless use_sliding_window is true.
  const std::string qwen = R"({"model_type": "qwen2", "vocab_size": 100, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 32768, "sliding_window": 4096, "use_sliding_window": false})";
  c = ParseModelConfig(qwen, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_position_embeddings, 32768);
  // Llama has no sliding window: a stray field changes nothing.
  std::string llama = json;
  llama.replace(llama.find("mistral"), 7, "llama");
  c = ParseModelConfig(llama, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->max_position_embeddings, 32768);
}

TEST(ConfigTest, Gpt2AttentionScalingVariantsAreRejected) {
  for (const char* extra :
       {R"("scale_attn_weights": false)", R"("scale_attn_by_inverse_layer_idx": true)"}) {
    const std::string json = std::string(R"({"model_type": "gpt2", "vocab_size": 100, "n_embd": 64,
      "n_head": 4, "n_layer": 2, "n_positions": 128, )") +
                             extra + "}";
    absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << extra;
    EXPECT_THAT(c.status().message(), HasSubstr(kPath));
  }
}

TEST(ConfigTest, ParsesQwen2WithAttentionBias) {
  // Qwen2-0.5B style: no "attention_bias" key, but q/k/v have biases.
  const std::string json = R"({
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
    "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "use_sliding_window": false, "sliding_window": 32768, "max_window_layers": 24,
    "tie_word_embeddings": true, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "bos_token_id": 151643, "eos_token_id": 151643})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, Family::kLlama);
  EXPECT_EQ(c->model_type, "qwen2");
  EXPECT_TRUE(c->attention_bias);
  EXPECT_FALSE(c->mlp_bias);
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_FLOAT_EQ(c->norm_eps, 1e-6f);
}

TEST(ConfigTest, ParsesGpt2WithNullInner) {
  const std::string json = R"({
    "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
    "activation_function": "gelu_new", "n_ctx": 1024, "n_embd": 768, "n_head": 12,
    "n_inner": null, "n_layer": 12, "n_positions": 1024, "layer_norm_epsilon": 1e-05,
    "vocab_size": 50257, "bos_token_id": 50256, "eos_token_id": 50256})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->family, Family::kGpt2);
  EXPECT_STREQ(FamilyName(c->family), "gpt2");
  EXPECT_EQ(c->model_type, "gpt2");
  EXPECT_EQ(c->hidden_size, 768);
  EXPECT_EQ(c->num_heads, 12);
  EXPECT_EQ(c->num_kv_heads, 12);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->num_layers, 12);
  EXPECT_EQ(c->intermediate_size, 4 * 768);
  EXPECT_EQ(c->max_position_embeddings, 1024);
  EXPECT_FLOAT_EQ(c->norm_eps, 1e-5f);
  EXPECT_EQ(c->hidden_act, "gelu_new");
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_TRUE(c->attention_bias);
  EXPECT_TRUE(c->mlp_bias);
  EXPECT_EQ(c->bos_token_id, 50256);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(50256));
}

TEST(ConfigTest, MalformedJsonIsInvalidArgument) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(R"({"model_type": "llama",)", kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(kPath));
  EXPECT_THAT(c.status().message(), HasSubstr("malformed JSON"));

  absl::StatusOr<ModelConfig> arr = ParseModelConfig("[1, 2]", kPath);
  ASSERT_FALSE(arr.ok());
  EXPECT_EQ(arr.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(arr.status().message(), HasSubstr(kPath));
}

TEST(ConfigTest, UnsupportedModelType) {
  absl::StatusOr<ModelConfig> c =
      ParseModelConfig(R"({"model_type": "mamba", "vocab_size": 10})", kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(kPath));
  EXPECT_THAT(c.status().message(), HasSubstr("unsupported model_type 'mamba'"));
  EXPECT_THAT(c.status().message(), HasSubstr("llama"));
}

TEST(ConfigTest, WrongFieldTypeNamesField) {
  std::string json = LlamaJson();
  json.replace(json.find("\"hidden_size\": 2048"), 19, "\"hidden_size\": \"2048\"");
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(kPath));
  EXPECT_THAT(c.status().message(),
              HasSubstr("field 'hidden_size' must be a positive integer (got string)"));
}

TEST(ConfigTest, OtherBadFieldsNameTheField) {
  struct Case {
    std::string extra;
    std::string want;
  };
  const std::vector<Case> cases = {
      {R"(, "tie_word_embeddings": "yes")", "field 'tie_word_embeddings' must be a boolean"},
      {R"(, "rms_norm_eps": -1)", "field 'rms_norm_eps' must be a positive number"},
      {R"(, "rope_theta": "big")", "field 'rope_theta' must be a positive number"},
      {R"(, "hidden_act": "relu")", "unsupported hidden_act 'relu'"},
      {R"(, "rope_scaling": {"rope_type": "yarn", "factor": 4.0})",
       "unsupported rope_scaling type 'yarn'"},
      {R"(, "rope_scaling": {"rope_type": "llama3", "factor": 8.0})",
       "missing required field 'rope_scaling.low_freq_factor'"},
      {R"(, "rope_scaling": 3)", "field 'rope_scaling' must be null or an object"},
      {R"(, "head_dim": 0)", "field 'head_dim' must be a positive integer"},
  };
  for (const Case& tc : cases) {
    absl::StatusOr<ModelConfig> c = ParseModelConfig(LlamaJson(tc.extra), kPath);
    ASSERT_FALSE(c.ok()) << tc.extra;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << tc.extra;
    EXPECT_THAT(c.status().message(), HasSubstr(kPath)) << tc.extra;
    EXPECT_THAT(c.status().message(), HasSubstr(tc.want)) << tc.extra;
  }
  // Missing required field, negative size, bad eos entry.
  std::string json = LlamaJson();
  json.replace(json.find("\"vocab_size\": 32000,"), 20, "");
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("missing required field 'vocab_size'"));
  json = LlamaJson();
  json.replace(json.find("\"num_hidden_layers\": 22"), 23, "\"num_hidden_layers\": -3");
  c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("field 'num_hidden_layers' must be a positive"));
  json = LlamaJson();
  json.replace(json.find("\"eos_token_id\": 2"), 17, "\"eos_token_id\": [2, \"x\"]");
  c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_THAT(c.status().message(), HasSubstr("field 'eos_token_id'"));
}

TEST(ConfigTest, HeadsNotDivisibleByKvHeads) {
  std::string json = LlamaJson();
  json.replace(json.find("\"num_key_value_heads\": 4"), 24, "\"num_key_value_heads\": 5");
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr(kPath));
  EXPECT_THAT(c.status().message(),
              HasSubstr("num_attention_heads (32) is not divisible by num_key_value_heads (5)"));
}

TEST(ConfigTest, HiddenNotDivisibleByHeads) {
  std::string json = LlamaJson();
  json.replace(json.find("\"hidden_size\": 2048"), 19, "\"hidden_size\": 2050");
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("hidden_size (2050) is not divisible"));
}

TEST(ConfigTest, Gpt2BadActivationRejected) {
  const std::string json = R"({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2,
    "n_positions": 128, "vocab_size": 100, "activation_function": "relu"})";
  absl::StatusOr<ModelConfig> c = ParseModelConfig(json, kPath);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("unsupported activation_function 'relu'"));
}

TEST(ConfigTest, GenerationConfigEosListOverridesConfig) {
  absl::StatusOr<ModelConfig> c = ParseModelConfig(LlamaJson(), kPath);
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_TRUE(ApplyGenerationConfig(
                  R"({"bos_token_id": 7, "eos_token_id": [2, 32000], "temperature": 0.6})",
                  "/models/x/generation_config.json", &*c)
                  .ok());
  EXPECT_EQ(c->bos_token_id, 7);
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 32000));

  ASSERT_TRUE(ApplyGenerationConfig(R"({"eos_token_id": 5})", "g.json", &*c).ok());
  EXPECT_THAT(c->eos_token_ids, ElementsAre(5));
  EXPECT_EQ(c->bos_token_id, 7);  // absent -> unchanged

  absl::Status bad = ApplyGenerationConfig(R"({"eos_token_id": "eos"})", "g.json", &*c);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bad.message(), HasSubstr("g.json: field 'eos_token_id'"));
  EXPECT_THAT(c->eos_token_ids, ElementsAre(5));  // untouched on error
}

TEST(ConfigTest, LoadModelConfigReadsGenerationConfig) {
  ScopedTempDir dir;
  ASSERT_TRUE(WriteFile(JoinPath(dir.path(), "config.json"), LlamaJson()).ok());
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2));

  ASSERT_TRUE(
      WriteFile(JoinPath(dir.path(), "generation_config.json"), R"({"eos_token_id": [2, 3]})")
          .ok());
  c = LoadModelConfig(dir.path());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_THAT(c->eos_token_ids, ElementsAre(2, 3));

  ASSERT_TRUE(WriteFile(JoinPath(dir.path(), "generation_config.json"), "{oops").ok());
  c = LoadModelConfig(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("generation_config.json"));
}

TEST(ConfigTest, MissingConfigJsonIsNotFound) {
  ScopedTempDir dir;
  absl::StatusOr<ModelConfig> c = LoadModelConfig(dir.path());
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(c.status().message(), HasSubstr(JoinPath(dir.path(), "config.json")));
}

TEST(ConfigTest, LlamaToJsonRoundTrips) {
  ModelConfig c;
  c.family = Family::kLlama;
  c.model_type = "llama";
  c.vocab_size = 1000;
  c.hidden_size = 64;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 16;
  c.intermediate_size = 176;
  c.max_position_embeddings = 512;
  c.norm_eps = 1e-5f;
  c.rope_theta = 500000.0f;
  c.rope_scaling.llama3 = true;
  c.rope_scaling.factor = 32.0f;
  c.rope_scaling.low_freq_factor = 1.0f;
  c.rope_scaling.high_freq_factor = 4.0f;
  c.rope_scaling.original_max_position_embeddings = 128;
  c.tie_word_embeddings = true;
  c.attention_bias = false;
  c.mlp_bias = true;
  c.hidden_act = "silu";
  c.torch_dtype = "float32";
  c.bos_token_id = 1;
  c.eos_token_ids = {2, 3};

  const std::string text = ModelConfigToJson(c);
  EXPECT_EQ(text, ModelConfigToJson(c));  // deterministic
  EXPECT_THAT(text, HasSubstr(R"("architectures": [
    "LlamaForCausalLM"
  ])"));
  EXPECT_THAT(text, HasSubstr(R"("rms_norm_eps": 1e-05)"));
  EXPECT_THAT(text, HasSubstr(R"("rope_type": "llama3")"));
  absl::StatusOr<ModelConfig> back = ParseModelConfig(text, "roundtrip.json");
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
  ExpectSameConfig(*back, c);

  // Without rope scaling, single eos, no bos; qwen2 with its biases.
  c.rope_scaling = RopeScaling();
  c.eos_token_ids = {2};
  c.bos_token_id = -1;
  c.model_type = "qwen2";
  c.attention_bias = true;
  c.norm_eps = 1e-6f;
  const std::string text2 = ModelConfigToJson(c);
  EXPECT_THAT(text2, HasSubstr("Qwen2ForCausalLM"));
  EXPECT_THAT(text2, HasSubstr(R"("rope_scaling": null)"));
  back = ParseModelConfig(text2, "roundtrip.json");
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text2;
  ExpectSameConfig(*back, c);

  // Generation config carries the ids.
  c.eos_token_ids = {7, 8};
  c.bos_token_id = 5;
  ModelConfig g;
  ASSERT_TRUE(ApplyGenerationConfig(GenerationConfigToJson(c), "gen.json", &g).ok());
  EXPECT_EQ(g.bos_token_id, 5);
  EXPECT_THAT(g.eos_token_ids, ElementsAre(7, 8));
}

TEST(ConfigTest, Gpt2ToJsonRoundTrips) {
  ModelConfig c;
  c.family = Family::kGpt2;
  c.model_type = "gpt2";
  c.vocab_size = 500;
  c.hidden_size = 96;
  c.num_layers = 3;
  c.num_heads = 6;
  c.num_kv_heads = 6;
  c.head_dim = 16;
  c.intermediate_size = 384;
  c.max_position_embeddings = 256;
  c.norm_eps = 1e-5f;
  c.tie_word_embeddings = true;
  c.attention_bias = true;
  c.mlp_bias = true;
  c.hidden_act = "gelu_new";
  c.bos_token_id = 499;
  c.eos_token_ids = {499};

  const std::string text = ModelConfigToJson(c);
  EXPECT_THAT(text, HasSubstr("GPT2LMHeadModel"));
  EXPECT_THAT(text, HasSubstr(R"("activation_function": "gelu_new")"));
  EXPECT_THAT(text, HasSubstr(R"("n_inner": 384)"));
  absl::StatusOr<ModelConfig> back = ParseModelConfig(text, "roundtrip.json");
  ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
  ExpectSameConfig(*back, c);
}

TEST(ConfigTest, GarbageNeverCrashes) {
  const std::string base = LlamaJson();
  for (size_t n = 0; n < base.size(); n += 7) {
    absl::StatusOr<ModelConfig> c = ParseModelConfig(base.substr(0, n), kPath);
    EXPECT_FALSE(c.ok());
  }
  for (const char* s :
       {"", "null", "1", "\"x\"", "{}", R"({"model_type": null})", R"({"model_type": 5})",
        "\xff\xfe{", R"({"model_type": "gpt2"})", R"({"model_type": "llama", "vocab_size": 1e400})",
        R"({"model_type": "llama", "vocab_size": 99999999999999999999999})"}) {
    absl::StatusOr<ModelConfig> c = ParseModelConfig(s, kPath);
    EXPECT_FALSE(c.ok()) << s;
    EXPECT_THAT(c.status().message(), HasSubstr(kPath)) << s;
  }
}

}  // namespace
}  // namespace kvrelay::model
