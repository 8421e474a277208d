#include "common/model/weights.h"

#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"
#include "kernels/ops.h"

namespace kvrelay::model {
namespace {

using kernels::DType;

class Loader {
 public:
  explicit Loader(Weights* w) : w_(w) {}

  // The tensor, with its data aligned for its element type: safetensors does not
  // promise aligned offsets, and typed loads of misaligned data are undefined.
  absl::StatusOr<TensorInfo> Get(const std::string& name, std::vector<int64_t> shape) {
    KVR_ASSIGN_OR_RETURN(TensorInfo t, w_->store->Get(prefix_ + name, shape));
    if (reinterpret_cast<uintptr_t>(t.data) % kernels::DTypeSize(t.dtype) != 0) {
      auto buf = std::make_unique<std::vector<uint8_t>>(
          static_cast<const uint8_t*>(t.data), static_cast<const uint8_t*>(t.data) + t.nbytes);
      t.data = buf->data();
      w_->owned.push_back(std::move(buf));
    }
    return t;
  }
  bool Has(const std::string& name) const { return w_->store->Has(prefix_ + name); }
  void set_prefix(std::string p) { prefix_ = std::move(p); }

  absl::StatusOr<std::vector<float>> F32(const std::string& name, std::vector<int64_t> shape) {
    KVR_ASSIGN_OR_RETURN(TensorInfo t, Get(name, shape));
    std::vector<float> out(t.numel());
    kernels::ToF32(t.data, t.dtype, t.numel(), out.data());
    w_->parameter_count += t.numel();
    w_->parameter_bytes += static_cast<int64_t>(out.size() * sizeof(float));
    return out;
  }

  const float* KeepF32(std::vector<float> v) {
    w_->owned_f32.push_back(std::make_unique<std::vector<float>>(std::move(v)));
    return w_->owned_f32.back()->data();
  }

  // A linear layer used in place ([out][in], HF nn.Linear).
  absl::StatusOr<Linear> Direct(const std::string& name, int64_t out, int64_t in) {
    KVR_ASSIGN_OR_RETURN(TensorInfo t, Get(name, {out, in}));
    w_->parameter_count += t.numel();
    w_->parameter_bytes += static_cast<int64_t>(t.nbytes);
    return Linear{t.dtype, t.data, out, in, nullptr};
  }

  // Several [out_i][in] matrices stacked into one [sum out_i][in] (converted to f32 when
  // their dtypes differ).
  absl::StatusOr<Linear> Stacked(const std::vector<std::pair<std::string, int64_t>>& parts,
                                 int64_t in) {
    std::vector<TensorInfo> ts;
    int64_t out = 0;
    bool same = true;
    for (const auto& [name, rows] : parts) {
      KVR_ASSIGN_OR_RETURN(TensorInfo t, Get(name, {rows, in}));
      if (!ts.empty() && t.dtype != ts[0].dtype) same = false;
      ts.push_back(t);
      out += rows;
    }
    const DType dt = same ? ts[0].dtype : DType::kF32;
    auto buf = std::make_unique<std::vector<uint8_t>>(static_cast<size_t>(out * in) *
                                                      kernels::DTypeSize(dt));
    uint8_t* p = buf->data();
    for (const TensorInfo& t : ts) {
      if (t.dtype == dt) {
        std::memcpy(p, t.data, t.nbytes);
      } else {
        kernels::ToF32(t.data, t.dtype, t.numel(), reinterpret_cast<float*>(p));
      }
      p += static_cast<size_t>(t.numel()) * kernels::DTypeSize(dt);
      w_->parameter_count += t.numel();
    }
    w_->parameter_bytes += static_cast<int64_t>(buf->size());
    Linear l{dt, buf->data(), out, in, nullptr};
    w_->owned.push_back(std::move(buf));
    return l;
  }

  // GPT-2 Conv1D weight stored [in][out]: transposed to [out][in].
  absl::StatusOr<Linear> Transposed(const std::string& name, int64_t in, int64_t out) {
    KVR_ASSIGN_OR_RETURN(TensorInfo t, Get(name, {in, out}));
    const size_t es = kernels::DTypeSize(t.dtype);
    auto buf = std::make_unique<std::vector<uint8_t>>(t.nbytes);
    const uint8_t* src = static_cast<const uint8_t*>(t.data);
    for (int64_t i = 0; i < in; ++i)
      for (int64_t o = 0; o < out; ++o)
        std::memcpy(buf->data() + (o * in + i) * es, src + (i * out + o) * es, es);
    w_->parameter_count += t.numel();
    w_->parameter_bytes += static_cast<int64_t>(buf->size());
    Linear l{t.dtype, buf->data(), out, in, nullptr};
    w_->owned.push_back(std::move(buf));
    return l;
  }

 private:
  Weights* w_;
  std::string prefix_;
};

absl::Status LoadLlama(const ModelConfig& c, Weights* w) {
  Loader ld(w);
  const int64_t H = c.hidden_size, hd = c.head_dim, nq = c.num_heads * hd,
                nkv = c.num_kv_heads * hd;
  const int64_t I = c.intermediate_size, V = c.vocab_size;
  KVR_ASSIGN_OR_RETURN(TensorInfo emb, ld.Get("model.embed_tokens.weight", {V, H}));
  w->embed = emb.data;
  w->embed_dtype = emb.dtype;
  w->parameter_count += emb.numel();
  w->parameter_bytes += static_cast<int64_t>(emb.nbytes);
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerWeights L;
    KVR_ASSIGN_OR_RETURN(L.norm1_w, ld.F32(p + "input_layernorm.weight", {H}));
    KVR_ASSIGN_OR_RETURN(L.norm2_w, ld.F32(p + "post_attention_layernorm.weight", {H}));
    KVR_ASSIGN_OR_RETURN(L.qkv, ld.Stacked({{p + "self_attn.q_proj.weight", nq},
                                            {p + "self_attn.k_proj.weight", nkv},
                                            {p + "self_attn.v_proj.weight", nkv}},
                                           H));
    if (c.attention_bias) {
      std::vector<float> b;
      for (const auto& [n, rows] : std::vector<std::pair<std::string, int64_t>>{
               {"q_proj", nq}, {"k_proj", nkv}, {"v_proj", nkv}}) {
        KVR_ASSIGN_OR_RETURN(std::vector<float> part,
                             ld.F32(p + "self_attn." + n + ".bias", {rows}));
        b.insert(b.end(), part.begin(), part.end());
      }
      L.qkv.bias = ld.KeepF32(std::move(b));
    }
    KVR_ASSIGN_OR_RETURN(L.o, ld.Direct(p + "self_attn.o_proj.weight", H, nq));
    if (ld.Has(p + "self_attn.o_proj.bias")) {
      KVR_ASSIGN_OR_RETURN(std::vector<float> b, ld.F32(p + "self_attn.o_proj.bias", {H}));
      L.o.bias = ld.KeepF32(std::move(b));
    }
    KVR_ASSIGN_OR_RETURN(
        L.up, ld.Stacked({{p + "mlp.gate_proj.weight", I}, {p + "mlp.up_proj.weight", I}}, H));
    KVR_ASSIGN_OR_RETURN(L.down, ld.Direct(p + "mlp.down_proj.weight", H, I));
    if (c.mlp_bias) {
      std::vector<float> b;
      for (const char* n : {"gate_proj", "up_proj"}) {
        KVR_ASSIGN_OR_RETURN(std::vector<float> part, ld.F32(p + "mlp." + n + ".bias", {I}));
        b.insert(b.end(), part.begin(), part.end());
      }
      L.up.bias = ld.KeepF32(std::move(b));
      KVR_ASSIGN_OR_RETURN(std::vector<float> db, ld.F32(p + "mlp.down_proj.bias", {H}));
      L.down.bias = ld.KeepF32(std::move(db));
    }
    w->layers.push_back(std::move(L));
  }
  KVR_ASSIGN_OR_RETURN(w->final_norm_w, ld.F32("model.norm.weight", {H}));
  if (c.tie_word_embeddings && !ld.Has("lm_head.weight")) {
    w->lm_head = Linear{w->embed_dtype, w->embed, V, H, nullptr};
  } else {
    KVR_ASSIGN_OR_RETURN(w->lm_head, ld.Direct("lm_head.weight", V, H));
  }
  return absl::OkStatus();
}

absl::Status LoadGpt2(const ModelConfig& c, Weights* w) {
  Loader ld(w);
  if (!w->store->Has("wte.weight") && w->store->Has("transformer.wte.weight"))
    ld.set_prefix("transformer.");
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  KVR_ASSIGN_OR_RETURN(TensorInfo emb, ld.Get("wte.weight", {V, H}));
  w->embed = emb.data;
  w->embed_dtype = emb.dtype;
  w->parameter_count += emb.numel();
  w->parameter_bytes += static_cast<int64_t>(emb.nbytes);
  KVR_ASSIGN_OR_RETURN(w->pos_embed, ld.F32("wpe.weight", {c.max_position_embeddings, H}));
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("h.", l, ".");
    LayerWeights L;
    KVR_ASSIGN_OR_RETURN(L.norm1_w, ld.F32(p + "ln_1.weight", {H}));
    KVR_ASSIGN_OR_RETURN(L.norm1_b, ld.F32(p + "ln_1.bias", {H}));
    KVR_ASSIGN_OR_RETURN(L.norm2_w, ld.F32(p + "ln_2.weight", {H}));
    KVR_ASSIGN_OR_RETURN(L.norm2_b, ld.F32(p + "ln_2.bias", {H}));
    KVR_ASSIGN_OR_RETURN(L.qkv, ld.Transposed(p + "attn.c_attn.weight", H, 3 * H));
    KVR_ASSIGN_OR_RETURN(std::vector<float> qkv_b, ld.F32(p + "attn.c_attn.bias", {3 * H}));
    L.qkv.bias = ld.KeepF32(std::move(qkv_b));
    KVR_ASSIGN_OR_RETURN(L.o, ld.Transposed(p + "attn.c_proj.weight", H, H));
    KVR_ASSIGN_OR_RETURN(std::vector<float> o_b, ld.F32(p + "attn.c_proj.bias", {H}));
    L.o.bias = ld.KeepF32(std::move(o_b));
    KVR_ASSIGN_OR_RETURN(L.up, ld.Transposed(p + "mlp.c_fc.weight", H, I));
    KVR_ASSIGN_OR_RETURN(std::vector<float> fc_b, ld.F32(p + "mlp.c_fc.bias", {I}));
    L.up.bias = ld.KeepF32(std::move(fc_b));
    KVR_ASSIGN_OR_RETURN(L.down, ld.Transposed(p + "mlp.c_proj.weight", I, H));
    KVR_ASSIGN_OR_RETURN(std::vector<float> pj_b, ld.F32(p + "mlp.c_proj.bias", {H}));
    L.down.bias = ld.KeepF32(std::move(pj_b));
    w->layers.push_back(std::move(L));
  }
  KVR_ASSIGN_OR_RETURN(w->final_norm_w, ld.F32("ln_f.weight", {H}));
  KVR_ASSIGN_OR_RETURN(w->final_norm_b, ld.F32("ln_f.bias", {H}));
  w->lm_head = Linear{w->embed_dtype, w->embed, V, H, nullptr};
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Weights>> LoadWeights(const ModelConfig& config,
                                                     std::unique_ptr<WeightStore> store) {
  auto w = std::make_unique<Weights>();
  w->store = std::move(store);
  if (config.family == Family::kLlama) {
    KVR_RETURN_IF_ERROR(LoadLlama(config, w.get()));
  } else {
    KVR_RETURN_IF_ERROR(LoadGpt2(config, w.get()));
  }
  return w;
}

}  // namespace kvrelay::model
