// Safetensors reader (mmap, validated) and writer.
// Format: u64 little-endian header length N, N bytes of JSON header
// {"name": {"dtype": "F32"|"F16"|"BF16", "shape": [..], "data_offsets": [begin, end]},
// "__metadata__": {...}}, then the data section; offsets are relative to the start of the data
// section.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/util/file.h"
#include "kernels/dtype.h"

namespace kvrelay::model {

struct TensorInfo {
  std::string name;
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;  // points into the mapping; valid while the owner lives
  size_t nbytes = 0;
  std::string file;  // path of the file holding it (for error messages)
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// One mapped .safetensors file. Open() validates everything before returning:
// header length within the file, header is a JSON object, every dtype supported
// (F32, F16, BF16; anything else -> INVALID_ARGUMENT naming tensor and dtype),
// shapes non-negative, end - begin == numel * dtype size, offsets within the data
// section, no two tensors overlapping. Every error names the file (and tensor).
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_.path(); }

 private:
  MappedFile file_;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All weights of a model folder: either <dir>/model.safetensors or the shards
// listed in <dir>/model.safetensors.index.json ({"weight_map": {tensor: file}}).
// With an index, each tensor must be in the shard the index names.
class WeightStore {
 public:
  static absl::StatusOr<std::unique_ptr<WeightStore>> Open(const std::string& dir);

  bool Has(const std::string& name) const;
  // NOT_FOUND "<dir>: tensor '<name>' missing" when absent; INVALID_ARGUMENT
  // "<file>: tensor '<name>' has shape [a, b], expected [c, d]" when the shape differs.
  absl::StatusOr<TensorInfo> Get(const std::string& name,
                                 const std::vector<int64_t>& expected_shape) const;
  std::vector<std::string> Names() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*> index_;
};

// A tensor to write. `data` holds numel * DTypeSize(dtype) bytes.
struct TensorToWrite {
  std::string name;
  kernels::DType dtype = kernels::DType::kF32;
  std::vector<int64_t> shape;
  std::string data;
};

// Writes a single .safetensors file, tensors in the given order, header padded to a
// multiple of 8 bytes. Deterministic: same input, same bytes.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace kvrelay::model
