#include "common/model/safetensors.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <fstream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/util/status.h"
#include "nlohmann/json.hpp"

namespace kvrelay::model {
namespace {

using Json = nlohmann::json;
using OrderedJson = nlohmann::ordered_json;
using kernels::DType;

constexpr const char* kMetadataKey = "__metadata__";
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";
// Same cap as the reference implementation: a header this big is corrupt, not a model.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

bool ParseSafetensorsDType(const std::string& s, DType* out) {
  if (s == "F32") {
    *out = DType::kF32;
  } else if (s == "F16") {
    *out = DType::kF16;
  } else if (s == "BF16") {
    *out = DType::kBF16;
  } else {
    return false;
  }
  return true;
}

const char* SafetensorsDTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
    default:
      return nullptr;
  }
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

bool AsUint64(const Json& v, uint64_t* out) {
  if (v.is_number_unsigned()) {
    *out = v.get<uint64_t>();
    return true;
  }
  if (v.is_number_integer()) {
    int64_t n = v.get<int64_t>();
    if (n < 0) return false;
    *out = static_cast<uint64_t>(n);
    return true;
  }
  return false;
}

// numel * elem_size of `shape`, or an error when it overflows int64.
bool ByteSize(const std::vector<int64_t>& shape, size_t elem_size, uint64_t* out) {
  constexpr uint64_t kMax = static_cast<uint64_t>(INT64_MAX);
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    uint64_t ud = static_cast<uint64_t>(d);
    if (ud != 0 && n > kMax / ud) return false;
    n *= ud;
  }
  if (n > kMax / elem_size) return false;
  *out = n * elem_size;
  return true;
}

struct Span {
  uint64_t begin;
  uint64_t end;
  const std::string* name;
};

absl::Status TensorError(const std::string& file, const std::string& name,
                         const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", name, "' ", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto f = std::make_unique<SafetensorsFile>();
  KVR_ASSIGN_OR_RETURN(f->file_, MappedFile::Open(path));
  const char* base = f->file_.data();
  const uint64_t size = f->file_.size();
  if (size < 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": truncated: ", size, " bytes, need at least 8"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | static_cast<uint8_t>(base[i]);
  }
  if (header_len > size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " runs past end of file (size ", size, ")"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " exceeds the limit of ", kMaxHeaderBytes));
  }
  const char* header_begin = base + 8;
  const char* data = header_begin + header_len;
  const uint64_t data_size = size - 8 - header_len;

  try {
    Json header = Json::parse(header_begin, data, /*cb=*/nullptr, /*allow_exceptions=*/false);
    if (header.is_discarded()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": header is not valid JSON"));
    }
    if (!header.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": header is not a JSON object (got ", header.type_name(), ")"));
    }
    std::vector<Span> spans;
    for (auto it = header.begin(); it != header.end(); ++it) {
      const std::string& name = it.key();
      const Json& v = it.value();
      if (name == kMetadataKey) {
        if (v.is_null()) continue;
        if (!v.is_object()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": __metadata__ must be an object of strings"));
        }
        for (auto m = v.begin(); m != v.end(); ++m) {
          if (!m.value().is_string()) {
            return absl::InvalidArgumentError(
                absl::StrCat(path, ": __metadata__ entry '", m.key(), "' is not a string"));
          }
          f->metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      if (!v.is_object()) return TensorError(path, name, "entry is not a JSON object");

      auto dt = v.find("dtype");
      if (dt == v.end() || !dt->is_string()) {
        return TensorError(path, name, "has no string 'dtype'");
      }
      TensorInfo info;
      info.name = name;
      info.file = path;
      const std::string dtype_str = dt->get<std::string>();
      if (!ParseSafetensorsDType(dtype_str, &info.dtype)) {
        return TensorError(
            path, name,
            absl::StrCat("has unsupported dtype '", dtype_str, "' (supported: F32, F16, BF16)"));
      }

      auto sh = v.find("shape");
      if (sh == v.end() || !sh->is_array()) {
        return TensorError(path, name, "has no 'shape' array");
      }
      for (const Json& d : *sh) {
        uint64_t ud = 0;
        if (!AsUint64(d, &ud) || ud > static_cast<uint64_t>(INT64_MAX)) {
          return TensorError(path, name,
                             absl::StrCat("has an invalid shape ", sh->dump(),
                                          " (dimensions must be non-negative integers)"));
        }
        info.shape.push_back(static_cast<int64_t>(ud));
      }

      auto off = v.find("data_offsets");
      uint64_t begin = 0, end = 0;
      if (off == v.end() || !off->is_array() || off->size() != 2 || !AsUint64((*off)[0], &begin) ||
          !AsUint64((*off)[1], &end)) {
        return TensorError(path, name,
                           "has invalid 'data_offsets' (need [begin, end] non-negative integers)");
      }
      if (begin > end) {
        return TensorError(
            path, name, absl::StrCat("has data_offsets [", begin, ", ", end, "] with begin > end"));
      }
      if (end > data_size) {
        return TensorError(path, name,
                           absl::StrCat("data_offsets [", begin, ", ", end,
                                        "] out of bounds (data section is ", data_size, " bytes)"));
      }
      uint64_t want = 0;
      if (!ByteSize(info.shape, kernels::DTypeSize(info.dtype), &want)) {
        return TensorError(path, name,
                           absl::StrCat("shape ", ShapeString(info.shape), " is too large"));
      }
      if (end - begin != want) {
        return TensorError(path, name,
                           absl::StrCat("byte size mismatch: data_offsets [", begin, ", ", end,
                                        "] span ", end - begin, " bytes, but ", dtype_str, " ",
                                        ShapeString(info.shape), " needs ", want));
      }
      info.data = data + begin;
      info.nbytes = static_cast<size_t>(want);
      auto inserted = f->tensors_.emplace(name, std::move(info));
      if (begin != end) spans.push_back({begin, end, &inserted.first->first});
    }

    // Overlap check over the non-empty tensors (empty ones own no bytes).
    std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    const Span* reach = nullptr;  // span with the largest end so far
    for (const Span& s : spans) {
      if (reach != nullptr && s.begin < reach->end) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensors '", *reach->name, "' and '", *s.name, "' overlap"));
      }
      if (reach == nullptr || s.end > reach->end) reach = &s;
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": invalid header: ", e.what()));
  }
  return f;
}

absl::StatusOr<std::unique_ptr<WeightStore>> WeightStore::Open(const std::string& dir) {
  auto store = std::make_unique<WeightStore>();
  store->dir_ = dir;
  const std::string index_path = JoinPath(dir, kIndexFile);
  const std::string single_path = JoinPath(dir, kSingleFile);

  auto add_file = [&](std::unique_ptr<SafetensorsFile> file) -> absl::Status {
    for (const auto& [name, info] : file->tensors()) {
      auto [it, inserted] = store->index_.emplace(name, &info);
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(dir, ": tensor '", name,
                                                       "' appears in both ", it->second->file,
                                                       " and ", file->path()));
      }
    }
    store->files_.push_back(std::move(file));
    return absl::OkStatus();
  };

  if (FileExists(index_path)) {
    KVR_ASSIGN_OR_RETURN(std::string text, ReadFile(index_path));
    // tensor name -> shard file name, as listed in the index.
    std::map<std::string, std::string> weight_map;
    try {
      Json j = Json::parse(text, /*cb=*/nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": not a JSON object"));
      }
      auto wm = j.find("weight_map");
      if (wm == j.end() || !wm->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": missing object field 'weight_map'"));
      }
      for (auto it = wm->begin(); it != wm->end(); ++it) {
        if (!it.value().is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(
              index_path, ": weight_map entry for tensor '", it.key(), "' is not a string"));
        }
        std::string shard = it.value().get<std::string>();
        if (shard.empty() || shard.find('/') != std::string::npos || shard == "." ||
            shard == "..") {
          return absl::InvalidArgumentError(absl::StrCat(index_path, ": shard '", shard,
                                                         "' for tensor '", it.key(),
                                                         "' is not a plain file name"));
        }
        weight_map.emplace(it.key(), std::move(shard));
      }
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": invalid index: ", e.what()));
    }
    if (weight_map.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": weight_map is empty"));
    }
    std::map<std::string, const SafetensorsFile*> shards;  // shard file name -> opened file
    for (const auto& [tensor, shard] : weight_map) shards.emplace(shard, nullptr);
    for (auto& [shard, opened] : shards) {
      KVR_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file,
                           SafetensorsFile::Open(JoinPath(dir, shard)));
      opened = file.get();
      KVR_RETURN_IF_ERROR(add_file(std::move(file)));
    }
    for (const auto& [tensor, shard] : weight_map) {
      const SafetensorsFile* file = shards.at(shard);
      if (file->tensors().count(tensor) == 0) {
        auto it = store->index_.find(tensor);
        return absl::InvalidArgumentError(absl::StrCat(
            index_path, ": tensor '", tensor, "' is listed in shard '", shard, "' but is not in ",
            file->path(),
            it == store->index_.end() ? std::string()
                                      : absl::StrCat(" (found in ", it->second->file, ")")));
      }
    }
    for (const auto& [name, info] : store->index_) {
      if (weight_map.count(name) == 0) {
        return absl::InvalidArgumentError(absl::StrCat(index_path, ": tensor '", name, "' in ",
                                                       info->file, " is not listed in the index"));
      }
    }
    return store;
  }

  if (FileExists(single_path)) {
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> file, SafetensorsFile::Open(single_path));
    KVR_RETURN_IF_ERROR(add_file(std::move(file)));
    return store;
  }
  return absl::NotFoundError(absl::StrCat(dir, ": no ", kSingleFile, " or ", kIndexFile));
}

bool WeightStore::Has(const std::string& name) const { return index_.count(name) != 0; }

absl::StatusOr<TensorInfo> WeightStore::Get(const std::string& name,
                                            const std::vector<int64_t>& expected_shape) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": tensor '", name, "' missing"));
  }
  const TensorInfo& info = *it->second;
  if (info.shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrCat(info.file, ": tensor '", name, "' has shape ",
                                                   ShapeString(info.shape), ", expected ",
                                                   ShapeString(expected_shape)));
  }
  return info;
}

std::vector<std::string> WeightStore::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, info] : index_) names.push_back(name);
  return names;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::string header_text;
  try {
    OrderedJson header = OrderedJson::object();
    if (!metadata.empty()) {
      OrderedJson meta = OrderedJson::object();
      for (const auto& [k, v] : metadata) meta[k] = v;
      header[kMetadataKey] = std::move(meta);
    }
    std::set<std::string> seen;
    uint64_t offset = 0;
    for (const TensorToWrite& t : tensors) {
      if (t.name == kMetadataKey || !seen.insert(t.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": tensor name '", t.name, "' is reserved or duplicated"));
      }
      const char* dtype = SafetensorsDTypeName(t.dtype);
      if (dtype == nullptr) {
        return TensorError(path, t.name,
                           absl::StrCat("has unsupported dtype ", kernels::DTypeName(t.dtype),
                                        " (supported: F32, F16, BF16)"));
      }
      uint64_t want = 0;
      if (!ByteSize(t.shape, kernels::DTypeSize(t.dtype), &want)) {
        return TensorError(path, t.name, absl::StrCat("has invalid shape ", ShapeString(t.shape)));
      }
      if (t.data.size() != want) {
        return TensorError(path, t.name,
                           absl::StrCat("has ", t.data.size(), " bytes of data, but ", dtype, " ",
                                        ShapeString(t.shape), " needs ", want));
      }
      OrderedJson entry;
      entry["dtype"] = dtype;
      entry["shape"] = t.shape;
      entry["data_offsets"] = {offset, offset + want};
      header[t.name] = std::move(entry);
      offset += want;
    }
    header_text = header.dump();  // strict UTF-8: throws on invalid names
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot encode header: ", e.what()));
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  char len_bytes[8];
  uint64_t n = header_text.size();
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);

  // Write to a temporary name and rename, so readers never see a half-written file.
  const std::string tmp_path = path + ".tmp";
  {
    std::ofstream out(tmp_path, std::ios::binary | std::ios::trunc);
    if (!out) return absl::PermissionDeniedError(absl::StrCat(tmp_path, ": cannot create"));
    out.write(len_bytes, 8);
    out.write(header_text.data(), static_cast<std::streamsize>(header_text.size()));
    for (const TensorToWrite& t : tensors) {
      out.write(t.data.data(), static_cast<std::streamsize>(t.data.size()));
    }
    out.close();
    if (!out) {
      std::remove(tmp_path.c_str());
      return absl::DataLossError(absl::StrCat(tmp_path, ": write error"));
    }
  }
  if (std::rename(tmp_path.c_str(), path.c_str()) != 0) {
    std::remove(tmp_path.c_str());
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot rename ", tmp_path));
  }
  return absl::OkStatus();
}

}  // namespace kvrelay::model
