#include "common/model/model_maker.h"

#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model/safetensors.h"
#include "common/tokenizer/bpe_trainer.h"
#include "common/util/file.h"
#include "common/util/status.h"

namespace kvrelay::model {
namespace {

using kernels::DType;

// splitmix64: a small, fully specified generator (same stream on every platform).
struct SplitMix64 {
  uint64_t state;
  uint64_t Next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Uniform() {
    return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0);
  }
};

class TensorWriter {
 public:
  TensorWriter(uint64_t seed, DType dtype, float std) : seed_(seed), dtype_(dtype), std_(std) {}

  // Uniform random values with standard deviation `std` (scaled by `gain`).
  void Random(const std::string& name, std::vector<int64_t> shape, float gain = 1.0f) {
    SplitMix64 rng{XXH3_64bits_withSeed(name.data(), name.size(), seed_)};
    const float a = std_ * gain * std::sqrt(3.0f);
    Add(name, std::move(shape), [&](int64_t) { return a * rng.Uniform(); });
  }
  void Constant(const std::string& name, std::vector<int64_t> shape, float v) {
    Add(name, std::move(shape), [&](int64_t) { return v; });
  }
  // Norm weights around 1 so the random model still has some structure.
  void NearOne(const std::string& name, std::vector<int64_t> shape) {
    SplitMix64 rng{XXH3_64bits_withSeed(name.data(), name.size(), seed_)};
    Add(name, std::move(shape), [&](int64_t) { return 1.0f + 0.1f * rng.Uniform(); });
  }

  std::vector<TensorToWrite>& tensors() { return tensors_; }

 private:
  template <typename F>
  void Add(const std::string& name, std::vector<int64_t> shape, F&& value) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    TensorToWrite t;
    t.name = name;
    t.dtype = dtype_;
    t.shape = std::move(shape);
    t.data.resize(static_cast<size_t>(n) * kernels::DTypeSize(dtype_));
    for (int64_t i = 0; i < n; ++i) {
      const float v = value(i);
      if (dtype_ == DType::kF32) {
        std::memcpy(&t.data[i * 4], &v, 4);
      } else {
        const uint16_t h = dtype_ == DType::kF16 ? kernels::F32ToF16(v) : kernels::F32ToBf16(v);
        std::memcpy(&t.data[i * 2], &h, 2);
      }
    }
    tensors_.push_back(std::move(t));
  }

  uint64_t seed_;
  DType dtype_;
  float std_;
  std::vector<TensorToWrite> tensors_;
};

// Parameters make-model would write for `c` (every tensor is built in memory first).
int64_t ParameterCount(const ModelConfig& c) {
  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size;
  const int64_t nq = static_cast<int64_t>(c.num_heads) * c.head_dim;
  const int64_t nkv = static_cast<int64_t>(c.num_kv_heads) * c.head_dim;
  const int64_t per_layer =
      c.family == Family::kGpt2 ? 4 * H * H + 2 * H * I : 2 * H * (nq + nkv) + 3 * H * I;
  return c.num_layers * per_layer + V * H * (c.tie_word_embeddings ? 1 : 2) +
         (c.family == Family::kGpt2 ? int64_t{c.max_position_embeddings} * H : 0);
}

absl::Status CheckSize(const ModelConfig& c, kernels::DType dtype) {
  const int64_t params = ParameterCount(c);
  const int64_t bytes = params * static_cast<int64_t>(kernels::DTypeSize(dtype));
  if (bytes > (int64_t{16} << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("make-model: ", params, " parameters (", bytes >> 20,
                     " MiB) is more than make-model writes (16 GiB)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ConfigFor(const MakeModelOptions& o, int bos_token_id,
                                      std::vector<int> eos_token_ids) {
  auto bad = [](const std::string& m) { return absl::InvalidArgumentError("make-model: " + m); };
  if (o.layers <= 0 || o.layers > 4096) {
    return bad(absl::StrCat("--layers must be in [1, 4096], got ", o.layers));
  }
  if (o.hidden <= 0 || o.hidden > (1 << 20)) {
    return bad(absl::StrCat("--hidden must be in [1, 2^20], got ", o.hidden));
  }
  if (o.intermediate < 0 || o.intermediate > (1 << 24)) {
    return bad(absl::StrCat("--intermediate must be in [0, 2^24], got ", o.intermediate));
  }
  if (o.heads <= 0 || o.hidden % o.heads != 0) {
    return bad(
        absl::StrCat("--heads must be > 0 and divide --hidden (", o.hidden, "), got ", o.heads));
  }
  if ((o.hidden / o.heads) % 2 != 0) return bad("--hidden / --heads (head size) must be even");
  if (o.max_pos <= 0 || o.max_pos > (1 << 24)) {
    return bad(absl::StrCat("--max-pos must be in [1, 2^24], got ", o.max_pos));
  }
  if (o.vocab < 300 || o.vocab > (1 << 24)) {
    return bad(absl::StrCat("--vocab must be in [300, 2^24], got ", o.vocab));
  }
  if (o.dtype == DType::kI8) return bad("--dtype must be f32, f16 or bf16");
  ModelConfig c;
  c.family = o.family;
  c.vocab_size = o.vocab;
  c.hidden_size = o.hidden;
  c.num_layers = o.layers;
  c.num_heads = o.heads;
  c.head_dim = o.hidden / o.heads;
  c.max_position_embeddings = o.max_pos;
  c.bos_token_id = bos_token_id;
  c.eos_token_ids = std::move(eos_token_ids);
  c.torch_dtype = o.dtype == DType::kF32   ? "float32"
                  : o.dtype == DType::kF16 ? "float16"
                                           : "bfloat16";
  if (o.family == Family::kGpt2) {
    c.model_type = "gpt2";
    c.num_kv_heads = o.heads;
    c.intermediate_size = o.intermediate > 0 ? o.intermediate : 4 * o.hidden;
    c.norm_eps = 1e-5f;
    c.tie_word_embeddings = true;
    c.attention_bias = true;
    c.mlp_bias = true;
    c.hidden_act = "gelu_new";
    KVR_RETURN_IF_ERROR(CheckSize(c, o.dtype));
    return c;
  }
  c.model_type = o.model_type.empty() ? "llama" : o.model_type;
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2") {
    return bad("--model-type must be llama, mistral or qwen2, got '" + c.model_type + "'");
  }
  if (o.kv_heads <= 0 || o.heads % o.kv_heads != 0) {
    return bad(absl::StrCat("--kv-heads must be > 0 and divide --heads (", o.heads, "), got ",
                            o.kv_heads));
  }
  c.num_kv_heads = o.kv_heads;
  c.intermediate_size = o.intermediate > 0 ? o.intermediate : ((8 * o.hidden / 3 + 15) / 16) * 16;
  c.norm_eps = 1e-5f;
  c.rope_theta = c.model_type == "llama" && o.rope_llama3 ? 500000.0f : 10000.0f;
  c.tie_word_embeddings = o.tie_embeddings;
  c.attention_bias = c.model_type == "qwen2";
  c.hidden_act = "silu";
  if (o.rope_llama3) {
    c.rope_scaling.llama3 = true;
    c.rope_scaling.factor = 8.0f;
    c.rope_scaling.low_freq_factor = 1.0f;
    c.rope_scaling.high_freq_factor = 4.0f;
    c.rope_scaling.original_max_position_embeddings = std::max(16, o.max_pos / 4);
  }
  KVR_RETURN_IF_ERROR(CheckSize(c, o.dtype));
  return c;
}

absl::Status MakeModel(const MakeModelOptions& o, const std::string& out_dir) {
  // Validate the shape (and its size) before spending time on the tokenizer.
  KVR_RETURN_IF_ERROR(ConfigFor(o, -1, {}).status());
  tokenizer::BpeTrainOptions topt;
  topt.style = o.family == Family::kGpt2 ? tokenizer::ByteLevelStyle::kGpt2
                                         : tokenizer::ByteLevelStyle::kLlama3;
  // The built-in corpus yields ~1k tokens; a larger model vocab is padded, as real
  // checkpoints often are.
  topt.vocab_size = std::min(o.vocab, 1 << 16);
  KVR_ASSIGN_OR_RETURN(tokenizer::TrainedTokenizer tok, tokenizer::TrainByteLevelBpe(topt));
  KVR_ASSIGN_OR_RETURN(ModelConfig c, ConfigFor(o, tok.bos_token_id, tok.eos_token_ids));

  const int64_t H = c.hidden_size, V = c.vocab_size, I = c.intermediate_size, hd = c.head_dim;
  const int64_t nq = c.num_heads * hd, nkv = c.num_kv_heads * hd;
  // Residual projections scaled down with depth, as GPT-2's initialisation does.
  const float resid_gain = 1.0f / std::sqrt(2.0f * c.num_layers);
  TensorWriter tw(o.seed, o.dtype, o.init_std);
  if (c.family == Family::kGpt2) {
    tw.Random("wte.weight", {V, H});
    tw.Random("wpe.weight", {c.max_position_embeddings, H}, 0.5f);
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string p = absl::StrCat("h.", l, ".");
      tw.NearOne(p + "ln_1.weight", {H});
      tw.Random(p + "ln_1.bias", {H});
      tw.Random(p + "attn.c_attn.weight", {H, 3 * H});  // Conv1D: [in][out]
      tw.Random(p + "attn.c_attn.bias", {3 * H});
      tw.Random(p + "attn.c_proj.weight", {H, H}, resid_gain);
      tw.Random(p + "attn.c_proj.bias", {H});
      tw.NearOne(p + "ln_2.weight", {H});
      tw.Random(p + "ln_2.bias", {H});
      tw.Random(p + "mlp.c_fc.weight", {H, I});
      tw.Random(p + "mlp.c_fc.bias", {I});
      tw.Random(p + "mlp.c_proj.weight", {I, H}, resid_gain);
      tw.Random(p + "mlp.c_proj.bias", {H});
    }
    tw.NearOne("ln_f.weight", {H});
    tw.Random("ln_f.bias", {H});
  } else {
    tw.Random("model.embed_tokens.weight", {V, H});
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string p = absl::StrCat("model.layers.", l, ".");
      tw.NearOne(p + "input_layernorm.weight", {H});
      tw.Random(p + "self_attn.q_proj.weight", {nq, H});
      tw.Random(p + "self_attn.k_proj.weight", {nkv, H});
      tw.Random(p + "self_attn.v_proj.weight", {nkv, H});
      if (c.attention_bias) {
        tw.Random(p + "self_attn.q_proj.bias", {nq});
        tw.Random(p + "self_attn.k_proj.bias", {nkv});
        tw.Random(p + "self_attn.v_proj.bias", {nkv});
      }
      tw.Random(p + "self_attn.o_proj.weight", {H, nq}, resid_gain);
      tw.NearOne(p + "post_attention_layernorm.weight", {H});
      tw.Random(p + "mlp.gate_proj.weight", {I, H});
      tw.Random(p + "mlp.up_proj.weight", {I, H});
      tw.Random(p + "mlp.down_proj.weight", {H, I}, resid_gain);
    }
    tw.NearOne("model.norm.weight", {H});
    if (!c.tie_word_embeddings) tw.Random("lm_head.weight", {V, H});
  }

  KVR_RETURN_IF_ERROR(MakeDirs(out_dir));
  KVR_RETURN_IF_ERROR(WriteFile(JoinPath(out_dir, "config.json"), ModelConfigToJson(c)));
  KVR_RETURN_IF_ERROR(
      WriteFile(JoinPath(out_dir, "generation_config.json"), GenerationConfigToJson(c)));
  KVR_RETURN_IF_ERROR(WriteFile(JoinPath(out_dir, "tokenizer.json"), tok.json));
  return WriteSafetensors(JoinPath(out_dir, "model.safetensors"), tw.tensors(), {{"format", "pt"}});
}

}  // namespace kvrelay::model
