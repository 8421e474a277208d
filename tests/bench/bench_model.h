// The ~134M-parameter Llama-shaped bf16 model the benchmarks share, written once to
// $KVRELAY_BENCH_DIR/kvrelay-bench-100m (default /tmp/kvrelay-bench-100m).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>

#include "common/model/model_maker.h"
#include "common/util/file.h"

namespace kvrelay::bench {

// Writes `options`' model to $KVRELAY_BENCH_DIR/<name> once; returns the folder.
inline std::string EnsureModel(const std::string& name, const model::MakeModelOptions& options) {
  const char* env = std::getenv("KVRELAY_BENCH_DIR");
  const std::string dir = std::string(env ? env : "/tmp") + "/" + name;
  if (!FileExists(dir + "/model.safetensors")) {
    const absl::Status s = model::MakeModel(options, dir);
    if (!s.ok()) {
      std::fprintf(stderr, "make-model: %s\n", std::string(s.message()).c_str());
      std::exit(1);
    }
  }
  return dir;
}

// make-model's defaults: the tests' tiny llama (2 layers, hidden 64).
inline std::string EnsureTinyBenchModel() {
  return EnsureModel("kvrelay-bench-tiny", model::MakeModelOptions());
}

inline std::string EnsureBenchModel() {
  model::MakeModelOptions o;
  o.layers = 12;
  o.hidden = 768;
  o.heads = 12;
  o.kv_heads = 12;
  o.intermediate = 2048;
  o.vocab = 32000;
  o.max_pos = 4096;
  o.dtype = kernels::DType::kBF16;
  return EnsureModel("kvrelay-bench-100m", o);
}

}  // namespace kvrelay::bench
