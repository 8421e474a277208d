// Test fixtures: tiny random models written with the project's own make-model code,
// one folder per variant, created once per test binary in a private temp folder.
#pragma once

#include <memory>
#include <ostream>
#include <string>
#include <vector>

#include "common/kvcache/kv_pool.h"
#include "common/model/model.h"
#include "common/model/model_maker.h"
#include "kernels/thread_pool.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::testing {

struct ModelVariant {
  std::string name;
  model::MakeModelOptions options;
};
inline void PrintTo(const ModelVariant& v, std::ostream* os) { *os << v.name; }

// llama GQA, llama MHA + tied embeddings, llama-3 rope scaling, qwen2 (q/k/v bias),
// mistral, gpt2; all tiny (2 layers, hidden 64) and seeded.
std::vector<ModelVariant> TinyVariants();

// Writes the variant's model folder once per process and returns its path.
std::string ModelDir(const ModelVariant& variant);

// Shared thread pool for tests (2 threads).
kernels::ThreadPool* TestPool();

// Loads (once per process) the variant's model.
const model::Model& LoadedModel(const ModelVariant& variant);

}  // namespace kvrelay::testing
