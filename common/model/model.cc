#include "common/model/model.h"

#include <cmath>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/util/status.h"
#include "kernels/device_math.h"
#include "kernels/ops.h"

namespace kvrelay::model {

using kernels::DType;

namespace {

// A float buffer that only grows.
class Buffer {
 public:
  float* Get(int64_t n) {
    if (static_cast<int64_t>(v_.size()) < n) v_.resize(n);
    return v_.data();
  }

 private:
  std::vector<float> v_;
};

struct Workspace {
  Buffer x, h, qkv, q, attn, mlp, act, tmp, last, normed;
};

}  // namespace

std::vector<float> RopeInvFreq(const ModelConfig& c) {
  const int half = c.head_dim / 2;
  std::vector<float> inv(half);
  // The same functions a device-side table would be built with (kernels/device_math.h).
  for (int i = 0; i < half; ++i)
    inv[i] = kernels::math::RopeBaseInvFreq(i, c.head_dim, c.rope_theta);
  if (c.rope_scaling.llama3) {
    const RopeScaling& s = c.rope_scaling;
    for (int i = 0; i < half; ++i) {
      inv[i] =
          kernels::math::Llama3ScaleInvFreq(inv[i], s.factor, s.low_freq_factor, s.high_freq_factor,
                                            s.original_max_position_embeddings);
    }
  }
  return inv;
}

Model::Model(ModelConfig config, std::unique_ptr<Weights> weights, kernels::ThreadPool* pool)
    : config_(std::move(config)), weights_(std::move(weights)), pool_(pool) {
  if (config_.family == Family::kLlama) inv_freq_ = RopeInvFreq(config_);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   kernels::ThreadPool* pool) {
  KVR_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<WeightStore> store, WeightStore::Open(dir));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Weights> weights, LoadWeights(config, std::move(store)));
  return FromParts(std::move(config), std::move(weights), pool);
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromParts(ModelConfig config,
                                                        std::unique_ptr<Weights> weights,
                                                        kernels::ThreadPool* pool) {
  if (pool == nullptr) return absl::InvalidArgumentError("model: a thread pool is required");
  if (config.head_dim % 2 != 0 || config.head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("model: head_dim must be even and <= 1024, got ", config.head_dim));
  }
  return std::unique_ptr<Model>(new Model(std::move(config), std::move(weights), pool));
}

kernels::PagedKvLayout Model::KvLayout(DType kv_dtype, int block_size) const {
  kernels::PagedKvLayout l;
  l.dtype = kv_dtype;
  l.num_layers = config_.num_layers;
  l.block_size = block_size;
  l.num_kv_heads = config_.num_kv_heads;
  l.head_dim = config_.head_dim;
  return l;
}

absl::Status Model::Forward(absl::Span<const SeqChunk> batch, const kernels::PagedKvView& kv,
                            std::vector<float>* logits) const {
  const ModelConfig& c = config_;
  const Weights& w = *weights_;
  const auto& L = kv.layout;
  if (logits == nullptr) return absl::InvalidArgumentError("forward: logits output is null");
  if (L.num_layers != c.num_layers || L.num_kv_heads != c.num_kv_heads ||
      L.head_dim != c.head_dim) {
    return absl::InvalidArgumentError("forward: KV pool layout does not match the model");
  }
  // Flatten the batch into T token rows, validating as we go.
  int64_t T = 0;
  for (const SeqChunk& s : batch) T += static_cast<int64_t>(s.tokens.size());
  std::vector<int32_t> ids(T);
  std::vector<int64_t> pos(T);
  std::vector<const int32_t*> tables(T);
  std::vector<int64_t> logit_rows;
  {
    int64_t t = 0;
    for (size_t si = 0; si < batch.size(); ++si) {
      const SeqChunk& s = batch[si];
      if (s.start_pos < 0) return absl::InvalidArgumentError("forward: negative start position");
      if (s.tokens.empty() && s.want_logits) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: sequence ", si, " wants logits but has no tokens"));
      }
      const int64_t end = s.start_pos + static_cast<int64_t>(s.tokens.size());
      if (end > c.max_position_embeddings) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: sequence ", si, " reaches position ", end,
                         ", past the context length ", c.max_position_embeddings));
      }
      if (!s.tokens.empty() && static_cast<int64_t>(s.block_table.size()) * L.block_size < end) {
        return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", si, " has ",
                                                       s.block_table.size(),
                                                       " blocks, too few for ", end, " tokens"));
      }
      for (int32_t b : s.block_table) {
        if (b < 0 || b >= kv.num_blocks) {
          return absl::InvalidArgumentError(
              absl::StrCat("forward: block id ", b, " outside the pool"));
        }
      }
      for (size_t i = 0; i < s.tokens.size(); ++i, ++t) {
        if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
          return absl::InvalidArgumentError(absl::StrCat("forward: token id ", s.tokens[i],
                                                         " out of range [0, ", c.vocab_size, ")"));
        }
        ids[t] = s.tokens[i];
        pos[t] = s.start_pos + static_cast<int64_t>(i);
        tables[t] = s.block_table.data();
      }
      if (s.want_logits) logit_rows.push_back(t - 1);
    }
  }

  if (T == 0) return absl::OkStatus();

  const int64_t H = c.hidden_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int64_t qkv_dim = (nh + 2 * nkv) * hd;
  const int64_t I = c.intermediate_size;
  const bool llama = c.family == Family::kLlama;
  // Activation buffers are reused across calls on this thread: fresh multi-megabyte
  // allocations each step would cost more in page faults than some of the ops. Every
  // buffer is fully written before it is read.
  thread_local Workspace ws;
  float* x = ws.x.Get(T * H);
  float* h = ws.h.Get(T * H);
  float* qkv = ws.qkv.Get(T * qkv_dim);
  float* q = ws.q.Get(T * nh * hd);
  float* attn = ws.attn.Get(T * nh * hd);
  float* mlp = ws.mlp.Get(T * (llama ? 2 * I : I));
  float* act = ws.act.Get(llama ? T * I : 0);
  float* tmp = ws.tmp.Get(T * H);

  kernels::EmbeddingGather(ids.data(), T, w.embed, w.embed_dtype, H, x);
  if (!llama) {
    for (int64_t t = 0; t < T; ++t) kernels::AddInPlace(&x[t * H], &w.pos_embed[pos[t] * H], H);
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto norm = [&](const std::vector<float>& nw, const std::vector<float>& nb, const float* in,
                  int64_t rows, float* out) {
    if (llama) {
      kernels::RmsNorm(in, nw.data(), rows, H, c.norm_eps, out);
    } else {
      kernels::LayerNorm(in, nw.data(), nb.data(), rows, H, c.norm_eps, out);
    }
  };
  auto linear = [&](const Linear& lin, const float* in, int64_t rows, float* out) {
    kernels::MatMul(pool_, in, rows, lin.in, lin.w, lin.dtype, lin.out, lin.bias, out);
  };

  for (int layer = 0; layer < c.num_layers; ++layer) {
    const LayerWeights& lw = w.layers[layer];
    norm(lw.norm1_w, lw.norm1_b, x, T, h);
    linear(lw.qkv, h, T, qkv);
    for (int64_t t = 0; t < T; ++t) {
      float* row = &qkv[t * qkv_dim];
      float* qr = row;
      float* kr = row + nh * hd;
      float* vr = kr + nkv * hd;
      if (llama) {
        kernels::Rope(qr, static_cast<int>(nh), static_cast<int>(hd), pos[t], inv_freq_.data());
        kernels::Rope(kr, static_cast<int>(nkv), static_cast<int>(hd), pos[t], inv_freq_.data());
      }
      std::memcpy(&q[t * nh * hd], qr, sizeof(float) * nh * hd);
      kernels::WriteKv(kv, tables[t][pos[t] / L.block_size],
                       static_cast<int>(pos[t] % L.block_size), layer, kr, vr);
    }
    kernels::PagedAttention(pool_, kv, layer, q, T, tables.data(), pos.data(), static_cast<int>(nh),
                            scale, attn);
    linear(lw.o, attn, T, tmp);
    kernels::AddInPlace(x, tmp, T * H);

    norm(lw.norm2_w, lw.norm2_b, x, T, h);
    linear(lw.up, h, T, mlp);
    if (llama) {
      kernels::SiluMul(mlp, T, I, act);
    } else {
      if (c.hidden_act == "gelu") {
        kernels::GeluErf(mlp, T * I);  // exact form (transformers GELUActivation)
      } else {
        kernels::GeluTanh(mlp, T * I);  // gelu_new / gelu_pytorch_tanh
      }
    }
    linear(lw.down, llama ? act : mlp, T, tmp);
    kernels::AddInPlace(x, tmp, T * H);
  }

  const int64_t S = static_cast<int64_t>(logit_rows.size());
  if (S == 0) return absl::OkStatus();
  float* last = ws.last.Get(S * H);
  float* normed = ws.normed.Get(S * H);
  for (int64_t i = 0; i < S; ++i)
    std::memcpy(&last[i * H], &x[logit_rows[i] * H], sizeof(float) * H);
  norm(w.final_norm_w, w.final_norm_b, last, S, normed);
  const size_t off = logits->size();
  logits->resize(off + static_cast<size_t>(S) * c.vocab_size);
  linear(w.lm_head, normed, S, logits->data() + off);
  return absl::OkStatus();
}

}  // namespace kvrelay::model
