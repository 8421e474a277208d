#include "common/model/config.h"

#include <charconv>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/util/file.h"
#include "common/util/status.h"
#include "nlohmann/json.hpp"

namespace kvrelay::model {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;

constexpr const char* kSupportedModelTypes = "llama, mistral, qwen2, gpt2";

const char* JsonTypeName(const Json& v) {
  if (v.is_number_integer()) return "integer";
  if (v.is_number_float()) return "number";
  return v.type_name();  // "null", "boolean", "string", "array", "object", ...
}

absl::Status FieldError(const std::string& path, const std::string& key, const std::string& what,
                        const Json& v) {
  return absl::InvalidArgumentError(
      absl::StrCat(path, ": field '", key, "' must be ", what, " (got ", JsonTypeName(v), ")"));
}

// Looks `key` up in object `obj`; null counts as absent.
const Json* Find(const Json& obj, const std::string& key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

// Converts an integral JSON number to int64 when it fits; false otherwise.
bool AsInt64(const Json& v, int64_t* out) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) return false;
    *out = static_cast<int64_t>(u);
    return true;
  }
  if (v.is_number_integer()) {
    *out = v.get<int64_t>();
    return true;
  }
  return false;
}

// Reads a positive int field. `dflt` < 0 means required.
absl::Status GetPositiveInt(const Json& obj, const std::string& key, const std::string& path,
                            int* out, int dflt = -1, const std::string& prefix = "") {
  const std::string name = prefix + key;
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (dflt >= 0) {
      *out = dflt;
      return absl::OkStatus();
    }
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing required field '", name, "'"));
  }
  int64_t n = 0;
  if (!AsInt64(*v, &n) || n <= 0 || n > INT_MAX) {
    return FieldError(path, name, "a positive integer", *v);
  }
  *out = static_cast<int>(n);
  return absl::OkStatus();
}

// Reads an optional token id (non-negative int); leaves *out unchanged when absent.
absl::Status GetTokenId(const Json& obj, const std::string& key, const std::string& path,
                        int* out) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  int64_t n = 0;
  if (!AsInt64(*v, &n) || n < 0 || n > INT_MAX) {
    return FieldError(path, key, "a non-negative integer", *v);
  }
  *out = static_cast<int>(n);
  return absl::OkStatus();
}

// Reads an optional eos id (int or list of ints). Sets *present when the field exists.
absl::Status GetTokenIdList(const Json& obj, const std::string& key, const std::string& path,
                            std::vector<int>* out, bool* present) {
  *present = false;
  const Json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  std::vector<int> ids;
  const char* what = "a non-negative integer or a list of them";
  if (v->is_array()) {
    for (const Json& e : *v) {
      int64_t n = 0;
      if (!AsInt64(e, &n) || n < 0 || n > INT_MAX) return FieldError(path, key, what, e);
      ids.push_back(static_cast<int>(n));
    }
  } else {
    int64_t n = 0;
    if (!AsInt64(*v, &n) || n < 0 || n > INT_MAX) return FieldError(path, key, what, *v);
    ids.push_back(static_cast<int>(n));
  }
  *out = std::move(ids);
  *present = true;
  return absl::OkStatus();
}

// Reads an optional positive finite float; leaves *out unchanged when absent.
// `prefix` is prepended to the key in messages (e.g. "rope_scaling.").
absl::Status GetPositiveFloat(const Json& obj, const std::string& key, const std::string& path,
                              float* out, bool required = false, const std::string& prefix = "") {
  const std::string name = prefix + key;
  const Json* v = Find(obj, key);
  if (v == nullptr) {
    if (!required) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing required field '", name, "'"));
  }
  if (!v->is_number()) return FieldError(path, name, "a positive number", *v);
  double d = v->get<double>();
  float f = static_cast<float>(d);
  if (!(d > 0) || !(f > 0) || f > 3.0e38f) return FieldError(path, name, "a positive number", *v);
  *out = f;
  return absl::OkStatus();
}

absl::Status GetBool(const Json& obj, const std::string& key, const std::string& path, bool* out) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_boolean()) return FieldError(path, key, "a boolean", *v);
  *out = v->get<bool>();
  return absl::OkStatus();
}

absl::Status GetString(const Json& obj, const std::string& key, const std::string& path,
                       std::string* out) {
  const Json* v = Find(obj, key);
  if (v == nullptr) return absl::OkStatus();
  if (!v->is_string()) return FieldError(path, key, "a string", *v);
  *out = v->get<std::string>();
  return absl::OkStatus();
}

absl::Status ParseRopeScaling(const Json& obj, const std::string& path, RopeScaling* out) {
  const Json* rs = Find(obj, "rope_scaling");
  if (rs == nullptr) return absl::OkStatus();
  if (!rs->is_object()) return FieldError(path, "rope_scaling", "null or an object", *rs);
  std::string type;
  const Json* t = Find(*rs, "rope_type");
  if (t == nullptr) t = Find(*rs, "type");
  if (t == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": field 'rope_scaling' has no 'rope_type' (or 'type')"));
  }
  if (!t->is_string()) return FieldError(path, "rope_scaling.rope_type", "a string", *t);
  type = t->get<std::string>();
  if (type == "default") return absl::OkStatus();  // transformers' spelling of "no scaling"
  if (type != "llama3") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": unsupported rope_scaling type '", type, "' (supported: llama3)"));
  }
  RopeScaling r;
  r.llama3 = true;
  const std::string pre = "rope_scaling.";
  KVR_RETURN_IF_ERROR(GetPositiveFloat(*rs, "factor", path, &r.factor, /*required=*/true, pre));
  KVR_RETURN_IF_ERROR(GetPositiveFloat(*rs, "low_freq_factor", path, &r.low_freq_factor,
                                       /*required=*/true, pre));
  KVR_RETURN_IF_ERROR(GetPositiveFloat(*rs, "high_freq_factor", path, &r.high_freq_factor,
                                       /*required=*/true, pre));
  KVR_RETURN_IF_ERROR(GetPositiveInt(*rs, "original_max_position_embeddings", path,
                                     &r.original_max_position_embeddings, /*dflt=*/-1, pre));
  if (!(r.high_freq_factor > r.low_freq_factor)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": rope_scaling: high_freq_factor (", r.high_freq_factor,
                     ") must be greater than low_freq_factor (", r.low_freq_factor, ")"));
  }
  *out = r;
  return absl::OkStatus();
}

absl::Status ParseLlama(const Json& j, const std::string& path, ModelConfig* c) {
  c->family = Family::kLlama;
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "vocab_size", path, &c->vocab_size));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "hidden_size", path, &c->hidden_size));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "num_hidden_layers", path, &c->num_layers));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "num_attention_heads", path, &c->num_heads));
  KVR_RETURN_IF_ERROR(
      GetPositiveInt(j, "num_key_value_heads", path, &c->num_kv_heads, c->num_heads));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "intermediate_size", path, &c->intermediate_size));
  KVR_RETURN_IF_ERROR(
      GetPositiveInt(j, "max_position_embeddings", path, &c->max_position_embeddings));
  if (Find(j, "head_dim") != nullptr) {
    KVR_RETURN_IF_ERROR(GetPositiveInt(j, "head_dim", path, &c->head_dim));
  } else {
    if (c->hidden_size % c->num_heads != 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": hidden_size (", c->hidden_size,
                                                     ") is not divisible by num_attention_heads (",
                                                     c->num_heads, ")"));
    }
    c->head_dim = c->hidden_size / c->num_heads;
  }
  if (c->head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": head_dim (", c->head_dim, ") must be even for RoPE"));
  }
  if (static_cast<int64_t>(c->num_heads) * c->head_dim > INT_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": num_attention_heads * head_dim is too large"));
  }
  if (c->num_heads % c->num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": num_attention_heads (", c->num_heads,
                                                   ") is not divisible by num_key_value_heads (",
                                                   c->num_kv_heads, ")"));
  }
  c->norm_eps = 1e-6f;  // transformers' default for the llama family
  KVR_RETURN_IF_ERROR(GetPositiveFloat(j, "rms_norm_eps", path, &c->norm_eps));
  c->rope_theta = 10000.0f;
  KVR_RETURN_IF_ERROR(GetPositiveFloat(j, "rope_theta", path, &c->rope_theta));
  KVR_RETURN_IF_ERROR(ParseRopeScaling(j, path, &c->rope_scaling));
  KVR_RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", path, &c->tie_word_embeddings));
  KVR_RETURN_IF_ERROR(GetBool(j, "attention_bias", path, &c->attention_bias));
  if (c->model_type == "qwen2") c->attention_bias = true;  // qwen2 always has q/k/v biases
  KVR_RETURN_IF_ERROR(GetBool(j, "mlp_bias", path, &c->mlp_bias));
  // Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is not
  // implemented; within the window it equals full attention, so the usable context
  // is clamped to the window and results stay exact.
  const Json* window = Find(j, "sliding_window");
  bool use_window = window != nullptr && window->is_number_integer() && c->model_type != "llama";
  if (c->model_type == "qwen2") {
    const Json* use = Find(j, "use_sliding_window");
    use_window = use_window && use != nullptr && use->is_boolean() && use->get<bool>();
  }
  if (use_window) {
    const int64_t w = window->get<int64_t>();
    if (w > 0 && w < c->max_position_embeddings) c->max_position_embeddings = static_cast<int>(w);
  }
  c->hidden_act = "silu";
  KVR_RETURN_IF_ERROR(GetString(j, "hidden_act", path, &c->hidden_act));
  if (c->hidden_act != "silu") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": unsupported hidden_act '", c->hidden_act, "' (supported: silu)"));
  }
  return absl::OkStatus();
}

absl::Status ParseGpt2(const Json& j, const std::string& path, ModelConfig* c) {
  c->family = Family::kGpt2;
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "vocab_size", path, &c->vocab_size));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "n_embd", path, &c->hidden_size));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "n_layer", path, &c->num_layers));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "n_head", path, &c->num_heads));
  KVR_RETURN_IF_ERROR(GetPositiveInt(j, "n_positions", path, &c->max_position_embeddings));
  if (c->hidden_size % c->num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": n_embd (", c->hidden_size, ") is not divisible by n_head (", c->num_heads, ")"));
  }
  c->num_kv_heads = c->num_heads;
  c->head_dim = c->hidden_size / c->num_heads;
  if (Find(j, "n_inner") != nullptr) {
    KVR_RETURN_IF_ERROR(GetPositiveInt(j, "n_inner", path, &c->intermediate_size));
  } else {
    if (c->hidden_size > INT_MAX / 4) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": n_embd is too large"));
    }
    c->intermediate_size = 4 * c->hidden_size;
  }
  c->norm_eps = 1e-5f;
  KVR_RETURN_IF_ERROR(GetPositiveFloat(j, "layer_norm_epsilon", path, &c->norm_eps));
  c->hidden_act = "gelu_new";
  KVR_RETURN_IF_ERROR(GetString(j, "activation_function", path, &c->hidden_act));
  if (c->hidden_act != "gelu_new" && c->hidden_act != "gelu" &&
      c->hidden_act != "gelu_pytorch_tanh") {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": unsupported activation_function '", c->hidden_act,
                     "' (supported: gelu_new, gelu, gelu_pytorch_tanh)"));
  }
  bool tie = true;
  KVR_RETURN_IF_ERROR(GetBool(j, "tie_word_embeddings", path, &tie));
  if (!tie) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": gpt2 with tie_word_embeddings=false is not supported"));
  }
  // Attention-scaling variants the forward pass does not implement: refuse rather than
  // silently compute something else.
  bool scale_attn_weights = true, scale_by_layer = false;
  KVR_RETURN_IF_ERROR(GetBool(j, "scale_attn_weights", path, &scale_attn_weights));
  KVR_RETURN_IF_ERROR(GetBool(j, "scale_attn_by_inverse_layer_idx", path, &scale_by_layer));
  if (!scale_attn_weights || scale_by_layer) {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        ": scale_attn_weights=false and scale_attn_by_inverse_layer_idx=true are not supported"));
  }
  c->tie_word_embeddings = true;
  c->attention_bias = true;
  c->mlp_bias = true;
  return absl::OkStatus();
}

absl::StatusOr<Json> ParseJsonObject(const std::string& json_text, const std::string& path) {
  Json j = Json::parse(json_text, /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON"));
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected a JSON object at top level (got ", j.type_name(), ")"));
  }
  return j;
}

absl::StatusOr<ModelConfig> ParseModelConfigImpl(const std::string& json_text,
                                                 const std::string& path) {
  KVR_ASSIGN_OR_RETURN(Json j, ParseJsonObject(json_text, path));
  ModelConfig c;
  const Json* mt = Find(j, "model_type");
  if (mt == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing required field 'model_type'"));
  }
  if (!mt->is_string()) return FieldError(path, "model_type", "a string", *mt);
  c.model_type = mt->get<std::string>();
  if (c.model_type == "llama" || c.model_type == "mistral" || c.model_type == "qwen2") {
    KVR_RETURN_IF_ERROR(ParseLlama(j, path, &c));
  } else if (c.model_type == "gpt2") {
    KVR_RETURN_IF_ERROR(ParseGpt2(j, path, &c));
  } else {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported model_type '", c.model_type,
                                                   "' (supported: ", kSupportedModelTypes, ")"));
  }
  KVR_RETURN_IF_ERROR(GetString(j, "torch_dtype", path, &c.torch_dtype));
  KVR_RETURN_IF_ERROR(GetTokenId(j, "bos_token_id", path, &c.bos_token_id));
  bool present = false;
  KVR_RETURN_IF_ERROR(GetTokenIdList(j, "eos_token_id", path, &c.eos_token_ids, &present));
  return c;
}

absl::Status ApplyGenerationConfigImpl(const std::string& json_text, const std::string& path,
                                       ModelConfig* config) {
  KVR_ASSIGN_OR_RETURN(Json j, ParseJsonObject(json_text, path));
  int bos = config->bos_token_id;
  KVR_RETURN_IF_ERROR(GetTokenId(j, "bos_token_id", path, &bos));
  std::vector<int> eos;
  bool eos_present = false;
  KVR_RETURN_IF_ERROR(GetTokenIdList(j, "eos_token_id", path, &eos, &eos_present));
  // Only commit once everything parsed; an empty list does not erase config.json's ids.
  config->bos_token_id = bos;
  if (eos_present && !eos.empty()) config->eos_token_ids = std::move(eos);
  return absl::OkStatus();
}

// Shortest decimal that round-trips the float, as a double ("1e-05", not 9.99999974e-06).
double FloatForJson(float f) {
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), f);
  if (res.ec != std::errc()) return static_cast<double>(f);
  *res.ptr = '\0';
  return std::strtod(buf, nullptr);
}

void PutTokenIds(const ModelConfig& c, OrderedJson* j) {
  if (c.bos_token_id >= 0) (*j)["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    (*j)["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    (*j)["eos_token_id"] = c.eos_token_ids;
  }
}

std::string Dump(const OrderedJson& j) {
  return j.dump(2, ' ', /*ensure_ascii=*/false, nlohmann::json::error_handler_t::replace) + "\n";
}

}  // namespace

const char* FamilyName(Family f) {
  switch (f) {
    case Family::kLlama:
      return "llama";
    case Family::kGpt2:
      return "gpt2";
  }
  return "unknown";
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text,
                                             const std::string& path) {
  try {
    return ParseModelConfigImpl(json_text, path);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid config: ", e.what()));
  }
}

absl::Status ApplyGenerationConfig(const std::string& json_text, const std::string& path,
                                   ModelConfig* config) {
  try {
    return ApplyGenerationConfigImpl(json_text, path, config);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": invalid generation config: ", e.what()));
  }
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string config_path = JoinPath(dir, "config.json");
  if (!FileExists(config_path)) {
    return absl::NotFoundError(absl::StrCat(config_path, ": no such file"));
  }
  KVR_ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
  KVR_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(text, config_path));
  const std::string gen_path = JoinPath(dir, "generation_config.json");
  if (FileExists(gen_path)) {
    KVR_ASSIGN_OR_RETURN(std::string gen_text, ReadFile(gen_path));
    KVR_RETURN_IF_ERROR(ApplyGenerationConfig(gen_text, gen_path, &config));
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  OrderedJson j;
  if (c.family == Family::kGpt2) {
    j["architectures"] = {"GPT2LMHeadModel"};
    j["model_type"] = "gpt2";
    j["vocab_size"] = c.vocab_size;
    j["n_embd"] = c.hidden_size;
    j["n_head"] = c.num_heads;
    j["n_layer"] = c.num_layers;
    j["n_positions"] = c.max_position_embeddings;
    j["n_inner"] = c.intermediate_size;
    j["layer_norm_epsilon"] = FloatForJson(c.norm_eps);
    j["activation_function"] = c.hidden_act.empty() ? "gelu_new" : c.hidden_act;
    j["tie_word_embeddings"] = true;
  } else {
    const std::string model_type = c.model_type.empty() ? "llama" : c.model_type;
    const char* arch = "LlamaForCausalLM";
    if (model_type == "mistral") arch = "MistralForCausalLM";
    if (model_type == "qwen2") arch = "Qwen2ForCausalLM";
    j["architectures"] = {arch};
    j["model_type"] = model_type;
    j["vocab_size"] = c.vocab_size;
    j["hidden_size"] = c.hidden_size;
    j["intermediate_size"] = c.intermediate_size;
    j["num_hidden_layers"] = c.num_layers;
    j["num_attention_heads"] = c.num_heads;
    j["num_key_value_heads"] = c.num_kv_heads;
    j["head_dim"] = c.head_dim;
    j["hidden_act"] = c.hidden_act.empty() ? "silu" : c.hidden_act;
    j["max_position_embeddings"] = c.max_position_embeddings;
    j["rms_norm_eps"] = FloatForJson(c.norm_eps);
    j["rope_theta"] = FloatForJson(c.rope_theta);
    if (c.rope_scaling.llama3) {
      OrderedJson rs;
      rs["rope_type"] = "llama3";
      rs["factor"] = FloatForJson(c.rope_scaling.factor);
      rs["low_freq_factor"] = FloatForJson(c.rope_scaling.low_freq_factor);
      rs["high_freq_factor"] = FloatForJson(c.rope_scaling.high_freq_factor);
      rs["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
      j["rope_scaling"] = std::move(rs);
    } else {
      j["rope_scaling"] = nullptr;
    }
    j["tie_word_embeddings"] = c.tie_word_embeddings;
    j["attention_bias"] = c.attention_bias;
    j["mlp_bias"] = c.mlp_bias;
  }
  if (!c.torch_dtype.empty()) j["torch_dtype"] = c.torch_dtype;
  PutTokenIds(c, &j);
  return Dump(j);
}

std::string GenerationConfigToJson(const ModelConfig& c) {
  OrderedJson j = OrderedJson::object();
  PutTokenIds(c, &j);
  return Dump(j);
}

}  // namespace kvrelay::model
