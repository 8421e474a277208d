#include "tests/testing/test_models.h"

#include <stdlib.h>

#include <cstdlib>
#include <map>
#include <mutex>

#include "gtest/gtest.h"

namespace kvrelay::testing {

std::vector<ModelVariant> TinyVariants() {
  std::vector<ModelVariant> v;
  model::MakeModelOptions base;
  base.layers = 2;
  base.hidden = 64;
  base.heads = 4;
  base.kv_heads = 2;
  base.vocab = 400;
  base.max_pos = 512;
  base.seed = 7;
  {
    ModelVariant m{"llama_gqa", base};
    v.push_back(m);
  }
  {
    ModelVariant m{"llama_mha_tied", base};
    m.options.kv_heads = 4;
    m.options.tie_embeddings = true;
    v.push_back(m);
  }
  {
    ModelVariant m{"llama3_rope", base};
    m.options.rope_llama3 = true;
    m.options.max_pos = 512;
    m.options.heads = 2;
    m.options.kv_heads = 1;
    v.push_back(m);
  }
  {
    ModelVariant m{"qwen2_bias", base};
    m.options.model_type = "qwen2";
    v.push_back(m);
  }
  {
    ModelVariant m{"gpt2", base};
    m.options.family = model::Family::kGpt2;
    m.options.heads = 4;
    v.push_back(m);
  }
  {
    ModelVariant m{"llama_bf16_weights", base};
    m.options.dtype = kernels::DType::kBF16;
    v.push_back(m);
  }
  return v;
}

namespace {
std::mutex g_mu;
std::map<std::string, std::string>& Dirs() {
  static auto* m = new std::map<std::string, std::string>();
  return *m;
}
std::map<std::string, std::unique_ptr<model::Model>>& Models() {
  static auto* m = new std::map<std::string, std::unique_ptr<model::Model>>();
  return *m;
}
}  // namespace

std::string ModelDir(const ModelVariant& variant) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = Dirs().find(variant.name);
  if (it != Dirs().end()) return it->second;
  std::string dir = MakeTempDir("kvr_model_") + "/" + variant.name;
  absl::Status s = model::MakeModel(variant.options, dir);
  EXPECT_TRUE(s.ok()) << s;
  Dirs()[variant.name] = dir;
  return dir;
}

kernels::ThreadPool* TestPool() {
  static auto* pool = new kernels::ThreadPool(2);
  return pool;
}

const model::Model& LoadedModel(const ModelVariant& variant) {
  const std::string dir = ModelDir(variant);
  std::lock_guard<std::mutex> lock(g_mu);
  auto& m = Models()[variant.name];
  if (!m) {
    auto loaded = model::Model::Load(dir, TestPool());
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    m = std::move(*loaded);
  }
  return *m;
}

}  // namespace kvrelay::testing
