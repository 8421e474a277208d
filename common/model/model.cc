#include "common/model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <map>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/util/status.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/device_math.h"

namespace kvrelay::model {

using kernels::DType;

// One Forward call's buffers, grown when a call needs more and otherwise reused. Every
// buffer is fully written before it is read.
struct Model::Workspace {
  // The batch's metadata on the host, then packed into one upload.
  std::vector<int32_t> ids, blocks, slots, seq_starts, tables;
  std::vector<int64_t> pos, start_pos, logit_rows;
  std::vector<uint8_t> staging;
  kernels::Buffer meta, x, h, qkv, q, attn, mlp, act, tmp, last, normed, logits;
};

// The weights as backend pointers (uploaded once at load), and the workspaces Forward
// calls reuse.
struct Model::OnBackend {
  struct Lin {
    const void* w = nullptr;
    DType dtype = DType::kF32;
    int64_t out = 0, in = 0;
    const float* bias = nullptr;
  };
  struct Layer {
    const float *norm1_w = nullptr, *norm1_b = nullptr, *norm2_w = nullptr, *norm2_b = nullptr;
    Lin qkv, o, up, down;
  };
  const void* embed = nullptr;
  const float* pos_embed = nullptr;
  const float *final_norm_w = nullptr, *final_norm_b = nullptr;
  Lin lm_head;
  std::vector<Layer> layers;
  const float* inv_freq = nullptr;
  std::vector<kernels::Buffer> constants;  // what the pointers above point into

  // Workspaces not in use by a Forward call: reused (activation buffers of several MB
  // allocated fresh on every step would cost more in page faults than some of the ops).
  absl::Mutex mu;
  std::vector<std::unique_ptr<Workspace>> idle ABSL_GUARDED_BY(mu);
};

namespace {

// `b` holding at least `bytes` (its old contents are not kept).
absl::StatusOr<void*> Grow(kernels::Backend& backend, kernels::Buffer* b, size_t bytes) {
  if (b->bytes() < bytes) {
    b->Reset();
    KVR_ASSIGN_OR_RETURN(*b, backend.Allocate(bytes));
  }
  return b->data();
}

template <typename T>
absl::StatusOr<T*> GrowFor(kernels::Backend& backend, kernels::Buffer* b, int64_t n) {
  KVR_ASSIGN_OR_RETURN(void* p, Grow(backend, b, sizeof(T) * static_cast<size_t>(n)));
  return static_cast<T*>(p);
}

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

Model::Model(ModelConfig config, std::unique_ptr<Weights> weights, kernels::ThreadPool* pool,
             std::unique_ptr<kernels::Backend> owned_backend, kernels::Backend* backend)
    : config_(std::move(config)),
      weights_(std::move(weights)),
      pool_(pool),
      owned_backend_(std::move(owned_backend)),
      backend_(backend) {
  if (config_.family == Family::kLlama) inv_freq_ = RopeInvFreq(config_);
}

Model::~Model() = default;

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   kernels::ThreadPool* pool) {
  if (pool == nullptr) return absl::InvalidArgumentError("model: a thread pool is required");
  KVR_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<WeightStore> store, WeightStore::Open(dir));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Weights> weights, LoadWeights(config, std::move(store)));
  return FromParts(std::move(config), std::move(weights), pool);
}

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   kernels::Backend* backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("model: a backend is required");
  KVR_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<WeightStore> store, WeightStore::Open(dir));
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<Weights> weights, LoadWeights(config, std::move(store)));
  return FromParts(std::move(config), std::move(weights), backend);
}

namespace {

absl::Status CheckParts(const ModelConfig& config, const Weights* weights) {
  if (weights == nullptr) return absl::InvalidArgumentError("model: weights are required");
  if (config.head_dim % 2 != 0 || config.head_dim > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("model: head_dim must be even and <= 1024, got ", config.head_dim));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> Model::FromParts(ModelConfig config,
                                                        std::unique_ptr<Weights> weights,
                                                        kernels::ThreadPool* pool) {
  if (pool == nullptr) return absl::InvalidArgumentError("model: a thread pool is required");
  KVR_RETURN_IF_ERROR(CheckParts(config, weights.get()));
  auto cpu = std::make_unique<kernels::CpuBackend>(pool);
  kernels::Backend* backend = cpu.get();
  std::unique_ptr<Model> m(
      new Model(std::move(config), std::move(weights), pool, std::move(cpu), backend));
  KVR_RETURN_IF_ERROR(m->Upload());
  return m;
}

absl::StatusOr<std::unique_ptr<Model>> Model::FromParts(ModelConfig config,
                                                        std::unique_ptr<Weights> weights,
                                                        kernels::Backend* backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("model: a backend is required");
  KVR_RETURN_IF_ERROR(CheckParts(config, weights.get()));
  std::unique_ptr<Model> m(
      new Model(std::move(config), std::move(weights), nullptr, nullptr, backend));
  KVR_RETURN_IF_ERROR(m->Upload());
  return m;
}

absl::Status Model::Upload() {
  auto ob = std::make_unique<OnBackend>();
  // Host address and size -> backend copy: a tied lm_head is the embedding, uploaded once.
  std::map<std::pair<const void*, size_t>, const void*> done;
  auto up = [&](const void* host, size_t bytes) -> absl::StatusOr<const void*> {
    if (host == nullptr || bytes == 0) return nullptr;
    auto it = done.find({host, bytes});
    if (it != done.end()) return it->second;
    KVR_ASSIGN_OR_RETURN(kernels::Buffer b, backend_->UploadConstant(host, bytes));
    const void* p = b.data();
    ob->constants.push_back(std::move(b));
    done[{host, bytes}] = p;
    return p;
  };
  auto f32 = [&](const float* host, size_t n) -> absl::StatusOr<const float*> {
    KVR_ASSIGN_OR_RETURN(const void* p, up(host, sizeof(float) * n));
    return static_cast<const float*>(p);
  };
  auto vec = [&](const std::vector<float>& v) { return f32(v.data(), v.size()); };
  auto lin = [&](const Linear& l) -> absl::StatusOr<OnBackend::Lin> {
    OnBackend::Lin d;
    d.dtype = l.dtype;
    d.out = l.out;
    d.in = l.in;
    KVR_ASSIGN_OR_RETURN(d.w,
                         up(l.w, static_cast<size_t>(l.out * l.in) * kernels::DTypeSize(l.dtype)));
    KVR_ASSIGN_OR_RETURN(d.bias, f32(l.bias, static_cast<size_t>(l.out)));
    return d;
  };

  const Weights& w = *weights_;
  const ModelConfig& c = config_;
  KVR_ASSIGN_OR_RETURN(ob->embed, up(w.embed, static_cast<size_t>(c.vocab_size) * c.hidden_size *
                                                  kernels::DTypeSize(w.embed_dtype)));
  KVR_ASSIGN_OR_RETURN(ob->pos_embed, vec(w.pos_embed));
  KVR_ASSIGN_OR_RETURN(ob->final_norm_w, vec(w.final_norm_w));
  KVR_ASSIGN_OR_RETURN(ob->final_norm_b, vec(w.final_norm_b));
  KVR_ASSIGN_OR_RETURN(ob->lm_head, lin(w.lm_head));
  for (const LayerWeights& lw : w.layers) {
    OnBackend::Layer d;
    KVR_ASSIGN_OR_RETURN(d.norm1_w, vec(lw.norm1_w));
    KVR_ASSIGN_OR_RETURN(d.norm1_b, vec(lw.norm1_b));
    KVR_ASSIGN_OR_RETURN(d.norm2_w, vec(lw.norm2_w));
    KVR_ASSIGN_OR_RETURN(d.norm2_b, vec(lw.norm2_b));
    KVR_ASSIGN_OR_RETURN(d.qkv, lin(lw.qkv));
    KVR_ASSIGN_OR_RETURN(d.o, lin(lw.o));
    KVR_ASSIGN_OR_RETURN(d.up, lin(lw.up));
    KVR_ASSIGN_OR_RETURN(d.down, lin(lw.down));
    ob->layers.push_back(d);
  }
  KVR_ASSIGN_OR_RETURN(ob->inv_freq, vec(inv_freq_));
  on_backend_ = std::move(ob);
  return absl::OkStatus();
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
  const auto& L = kv.layout;
  if (logits == nullptr) return absl::InvalidArgumentError("forward: logits output is null");
  if (L.num_layers != c.num_layers || L.num_kv_heads != c.num_kv_heads ||
      L.head_dim != c.head_dim) {
    return absl::InvalidArgumentError("forward: KV pool layout does not match the model");
  }
  kernels::Backend& be = *backend_;
  if (kv.memory != be.memory_kind()) {
    return absl::FailedPreconditionError(
        absl::StrCat("forward: the KV pool is in ", kernels::MemoryKindName(kv.memory),
                     " memory but the ", kernels::DeviceName(be.device()), " backend works on ",
                     kernels::MemoryKindName(be.memory_kind()), " memory"));
  }
  // Validate the batch; count its token rows, the sequences that have tokens, and the
  // longest block table they use.
  int64_t T = 0, num_seqs = 0, max_blocks = 0, max_query = 0;
  int num_decode_seqs = 0;  // leading sequences of one token each (TokenBatch)
  for (size_t si = 0; si < batch.size(); ++si) {
    const SeqChunk& s = batch[si];
    if (s.start_pos < 0) return absl::InvalidArgumentError("forward: negative start position");
    if (s.tokens.empty() && s.want_logits) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: sequence ", si, " wants logits but has no tokens"));
    }
    const int64_t end = s.start_pos + static_cast<int64_t>(s.tokens.size());
    if (end > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", si, " reaches position ",
                                                     end, ", past the context length ",
                                                     c.max_position_embeddings));
    }
    if (!s.tokens.empty() && static_cast<int64_t>(s.block_table.size()) * L.block_size < end) {
      return absl::InvalidArgumentError(absl::StrCat("forward: sequence ", si, " has ",
                                                     s.block_table.size(), " blocks, too few for ",
                                                     end, " tokens"));
    }
    for (int32_t b : s.block_table) {
      if (b < 0 || b >= kv.num_blocks) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: block id ", b, " outside the pool"));
      }
    }
    for (int32_t id : s.tokens) {
      if (id < 0 || id >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: token id ", id, " out of range [0, ", c.vocab_size, ")"));
      }
    }
    if (!s.tokens.empty()) {
      if (s.tokens.size() == 1 && num_decode_seqs == num_seqs) ++num_decode_seqs;
      T += static_cast<int64_t>(s.tokens.size());
      ++num_seqs;
      max_blocks = std::max(max_blocks, (end + L.block_size - 1) / L.block_size);
      max_query = std::max(max_query, static_cast<int64_t>(s.tokens.size()));
    }
  }
  if (T == 0) return absl::OkStatus();
  if (T > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError(absl::StrCat("forward: ", T, " tokens in one batch"));
  }

  // A workspace of our own for this call, back to the idle list when done.
  OnBackend& ob = *on_backend_;
  std::unique_ptr<Workspace> ws_owner;
  {
    absl::MutexLock lock(&ob.mu);
    if (!ob.idle.empty()) {
      ws_owner = std::move(ob.idle.back());
      ob.idle.pop_back();
    }
  }
  if (ws_owner == nullptr) ws_owner = std::make_unique<Workspace>();
  struct GiveBack {
    OnBackend& ob;
    std::unique_ptr<Workspace>& ws;
    ~GiveBack() {
      absl::MutexLock lock(&ob.mu);
      ob.idle.push_back(std::move(ws));
    }
  } give_back{ob, ws_owner};
  Workspace& ws = *ws_owner;

  // Flatten the batch into T token rows (id, position, block and slot of its K/V) and
  // num_seqs sequences (first row, first position, block table padded with -1).
  ws.ids.resize(T);
  ws.pos.resize(T);
  ws.blocks.resize(T);
  ws.slots.resize(T);
  ws.seq_starts.resize(num_seqs + 1);
  ws.start_pos.resize(num_seqs);
  ws.tables.assign(num_seqs * max_blocks, -1);
  ws.logit_rows.clear();
  int64_t max_context = 0;
  {
    int64_t t = 0, si = 0;
    for (const SeqChunk& s : batch) {
      if (s.tokens.empty()) continue;
      const int64_t end = s.start_pos + static_cast<int64_t>(s.tokens.size());
      const int64_t used = (end + L.block_size - 1) / L.block_size;
      ws.seq_starts[si] = static_cast<int32_t>(t);
      ws.start_pos[si] = s.start_pos;
      std::copy(s.block_table.begin(), s.block_table.begin() + used,
                ws.tables.begin() + si * max_blocks);
      for (size_t i = 0; i < s.tokens.size(); ++i, ++t) {
        const int64_t p = s.start_pos + static_cast<int64_t>(i);
        ws.ids[t] = s.tokens[i];
        ws.pos[t] = p;
        ws.blocks[t] = s.block_table[p / L.block_size];
        ws.slots[t] = static_cast<int32_t>(p % L.block_size);
      }
      max_context = std::max(max_context, end);
      ++si;
      if (s.want_logits) ws.logit_rows.push_back(t - 1);
    }
    ws.seq_starts[si] = static_cast<int32_t>(t);
  }
  const int64_t S = static_cast<int64_t>(ws.logit_rows.size());

  // All of it in one upload: int64 arrays first, then int32 ones.
  size_t meta_bytes = 0;
  auto place = [&](size_t bytes) {
    const size_t at = meta_bytes;
    meta_bytes += (bytes + 7) / 8 * 8;
    return at;
  };
  const size_t pos_at = place(sizeof(int64_t) * ws.pos.size());
  const size_t start_pos_at = place(sizeof(int64_t) * ws.start_pos.size());
  const size_t logit_rows_at = place(sizeof(int64_t) * ws.logit_rows.size());
  const size_t ids_at = place(sizeof(int32_t) * ws.ids.size());
  const size_t blocks_at = place(sizeof(int32_t) * ws.blocks.size());
  const size_t slots_at = place(sizeof(int32_t) * ws.slots.size());
  const size_t seq_starts_at = place(sizeof(int32_t) * ws.seq_starts.size());
  const size_t tables_at = place(sizeof(int32_t) * ws.tables.size());
  ws.staging.resize(meta_bytes);
  auto stage = [&](size_t at, const auto& v) {
    if (!v.empty()) std::memcpy(ws.staging.data() + at, v.data(), sizeof(v[0]) * v.size());
  };
  stage(pos_at, ws.pos);
  stage(start_pos_at, ws.start_pos);
  stage(logit_rows_at, ws.logit_rows);
  stage(ids_at, ws.ids);
  stage(blocks_at, ws.blocks);
  stage(slots_at, ws.slots);
  stage(seq_starts_at, ws.seq_starts);
  stage(tables_at, ws.tables);
  KVR_ASSIGN_OR_RETURN(void* meta, Grow(be, &ws.meta, meta_bytes));
  KVR_RETURN_IF_ERROR(be.Upload(ws.staging.data(), meta_bytes, meta));
  auto i64 = [&](size_t at) {
    return reinterpret_cast<const int64_t*>(static_cast<uint8_t*>(meta) + at);
  };
  auto i32 = [&](size_t at) {
    return reinterpret_cast<const int32_t*>(static_cast<uint8_t*>(meta) + at);
  };
  kernels::TokenBatch tb;
  tb.num_tokens = T;
  tb.positions = i64(pos_at);
  tb.blocks = i32(blocks_at);
  tb.slots = i32(slots_at);
  tb.num_seqs = static_cast<int>(num_seqs);
  tb.seq_starts = i32(seq_starts_at);
  tb.start_positions = i64(start_pos_at);
  tb.block_tables = i32(tables_at);
  tb.max_blocks_per_seq = max_blocks;
  tb.max_query_len = max_query;
  tb.max_context = max_context;
  tb.num_decode_seqs = num_decode_seqs;
  const int32_t* d_ids = i32(ids_at);
  const int64_t* d_logit_rows = i64(logit_rows_at);

  const int64_t H = c.hidden_size, hd = c.head_dim, nh = c.num_heads, nkv = c.num_kv_heads;
  const int64_t qkv_dim = (nh + 2 * nkv) * hd;
  const int64_t I = c.intermediate_size;
  const bool llama = c.family == Family::kLlama;
  KVR_ASSIGN_OR_RETURN(float* x, GrowFor<float>(be, &ws.x, T * H));
  KVR_ASSIGN_OR_RETURN(float* h, GrowFor<float>(be, &ws.h, T * H));
  KVR_ASSIGN_OR_RETURN(float* qkv, GrowFor<float>(be, &ws.qkv, T * qkv_dim));
  KVR_ASSIGN_OR_RETURN(float* q, GrowFor<float>(be, &ws.q, T * nh * hd));
  KVR_ASSIGN_OR_RETURN(float* attn, GrowFor<float>(be, &ws.attn, T * nh * hd));
  KVR_ASSIGN_OR_RETURN(float* mlp, GrowFor<float>(be, &ws.mlp, T * (llama ? 2 * I : I)));
  KVR_ASSIGN_OR_RETURN(float* act, GrowFor<float>(be, &ws.act, llama ? T * I : 0));
  KVR_ASSIGN_OR_RETURN(float* tmp, GrowFor<float>(be, &ws.tmp, T * H));

  KVR_RETURN_IF_ERROR(
      be.EmbeddingGather(d_ids, T, ob.embed, weights_->embed_dtype, c.vocab_size, H, x));
  if (!llama)
    KVR_RETURN_IF_ERROR(
        be.AddPositionEmbedding(ob.pos_embed, c.max_position_embeddings, tb.positions, T, H, x));
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto norm = [&](const float* nw, const float* nb, const float* in, int64_t rows, float* out) {
    return llama ? be.RmsNorm(in, nw, rows, H, c.norm_eps, out)
                 : be.LayerNorm(in, nw, nb, rows, H, c.norm_eps, out);
  };
  auto linear = [&](const OnBackend::Lin& lin, const float* in, int64_t rows, float* out) {
    return be.Linear(in, rows, lin.in, lin.w, lin.dtype, lin.out, lin.bias, out);
  };

  for (int layer = 0; layer < c.num_layers; ++layer) {
    const OnBackend::Layer& lw = ob.layers[layer];
    KVR_RETURN_IF_ERROR(norm(lw.norm1_w, lw.norm1_b, x, T, h));
    KVR_RETURN_IF_ERROR(linear(lw.qkv, h, T, qkv));
    KVR_RETURN_IF_ERROR(be.RopeAndWriteKv(kv, layer, tb, qkv, static_cast<int>(nh),
                                          llama ? ob.inv_freq : nullptr, q));
    KVR_RETURN_IF_ERROR(be.PagedAttention(kv, layer, tb, q, static_cast<int>(nh), scale, attn));
    KVR_RETURN_IF_ERROR(linear(lw.o, attn, T, tmp));
    KVR_RETURN_IF_ERROR(be.AddInPlace(x, tmp, T * H));

    KVR_RETURN_IF_ERROR(norm(lw.norm2_w, lw.norm2_b, x, T, h));
    KVR_RETURN_IF_ERROR(linear(lw.up, h, T, mlp));
    if (llama) {
      KVR_RETURN_IF_ERROR(be.SiluMul(mlp, T, I, act));
    } else if (c.hidden_act == "gelu") {
      KVR_RETURN_IF_ERROR(be.GeluErf(mlp, T * I));  // exact form (transformers GELUActivation)
    } else {
      KVR_RETURN_IF_ERROR(be.GeluTanh(mlp, T * I));  // gelu_new / gelu_pytorch_tanh
    }
    KVR_RETURN_IF_ERROR(linear(lw.down, llama ? act : mlp, T, tmp));
    KVR_RETURN_IF_ERROR(be.AddInPlace(x, tmp, T * H));
  }

  // The pool holds this pass's K/V once the queued work is done.
  if (S == 0) return be.Synchronize();
  KVR_ASSIGN_OR_RETURN(float* last, GrowFor<float>(be, &ws.last, S * H));
  KVR_ASSIGN_OR_RETURN(float* normed, GrowFor<float>(be, &ws.normed, S * H));
  KVR_ASSIGN_OR_RETURN(float* out, GrowFor<float>(be, &ws.logits, S * c.vocab_size));
  KVR_RETURN_IF_ERROR(be.GatherRows(x, T, H, d_logit_rows, S, last));
  KVR_RETURN_IF_ERROR(norm(ob.final_norm_w, ob.final_norm_b, last, S, normed));
  KVR_RETURN_IF_ERROR(linear(ob.lm_head, normed, S, out));
  const size_t off = logits->size();
  const size_t n = static_cast<size_t>(S) * c.vocab_size;
  logits->resize(off + n);
  if (absl::Status st = be.Download(out, sizeof(float) * n, logits->data() + off); !st.ok()) {
    logits->resize(off);
    return st;
  }
  return absl::OkStatus();
}

}  // namespace kvrelay::model
