#include "common/model/safetensors.h"

#include <stdlib.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/util/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::model {
namespace {

using kernels::DType;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

using testing::ScopedTempDir;

// Raw file bytes: u64 LE header length, header, data.
std::string RawFile(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string WriteRaw(const ScopedTempDir& dir, const std::string& name, const std::string& bytes) {
  std::string path = dir.File(name);
  EXPECT_TRUE(WriteFile(path, bytes).ok());
  return path;
}

std::string F32Bytes(const std::vector<float>& v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

std::string U16Bytes(const std::vector<uint16_t>& v) {
  std::string s(v.size() * 2, '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

std::string SpanBytes(const TensorInfo& t) {
  return std::string(static_cast<const char*>(t.data), t.nbytes);
}

// Expects `path` to fail to open with INVALID_ARGUMENT and a message with the path and `want`.
void ExpectOpenError(const std::string& path, const std::string& want) {
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_FALSE(f.ok()) << "expected failure: " << want;
  EXPECT_EQ(f.status().code(), absl::StatusCode::kInvalidArgument) << f.status();
  EXPECT_THAT(f.status().message(), HasSubstr(path));
  EXPECT_THAT(f.status().message(), HasSubstr(want));
}

TEST(SafetensorsTest, WriteOpenRoundTripAllDtypes) {
  ScopedTempDir dir;
  std::vector<uint16_t> f16, bf16;
  for (int i = 0; i < 6; ++i) {
    f16.push_back(kernels::F32ToF16(0.5f * i - 1.0f));
    bf16.push_back(kernels::F32ToBf16(1.25f * i));
  }
  const std::vector<TensorToWrite> tensors = {
      {"model.embed_tokens.weight", DType::kF32, {2, 3}, F32Bytes({1, 2, 3, 4, 5, -6.5f})},
      {"a.f16", DType::kF16, {3, 2}, U16Bytes(f16)},
      {"b.bf16", DType::kBF16, {6}, U16Bytes(bf16)},
      {"scalar", DType::kF32, {}, F32Bytes({42.0f})},
      {"empty", DType::kF16, {0, 4}, ""},
  };
  const std::string path = dir.File("model.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}}).ok());

  absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->path(), path);
  ASSERT_EQ((*f)->tensors().size(), tensors.size());
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
  for (const TensorToWrite& t : tensors) {
    const TensorInfo& info = (*f)->tensors().at(t.name);
    EXPECT_EQ(info.name, t.name);
    EXPECT_EQ(info.dtype, t.dtype) << t.name;
    EXPECT_EQ(info.shape, t.shape) << t.name;
    EXPECT_EQ(info.nbytes, t.data.size()) << t.name;
    EXPECT_EQ(info.file, path);
    EXPECT_EQ(SpanBytes(info), t.data) << t.name;
  }
  EXPECT_EQ((*f)->tensors().at("scalar").numel(), 1);
  EXPECT_EQ((*f)->tensors().at("empty").numel(), 0);

  // Header: padded to a multiple of 8, metadata first, tensors in the given order.
  absl::StatusOr<std::string> bytes = ReadFile(path);
  ASSERT_TRUE(bytes.ok());
  uint64_t n = 0;
  std::memcpy(&n, bytes->data(), 8);  // test host is little-endian
  EXPECT_EQ(n % 8, 0u);
  const std::string header = bytes->substr(8, n);
  EXPECT_EQ(header.find("{\"__metadata__\""), 0u) << header;
  EXPECT_LT(header.find("model.embed_tokens.weight"), header.find("a.f16"));
  EXPECT_LT(header.find("a.f16"), header.find("b.bf16"));
  EXPECT_THAT(header, HasSubstr(R"("data_offsets":[24,36])"));  // consecutive offsets

  // Deterministic: same input, same bytes.
  const std::string path2 = dir.File("again.safetensors");
  ASSERT_TRUE(WriteSafetensors(path2, tensors, {{"format", "pt"}}).ok());
  absl::StatusOr<std::string> bytes2 = ReadFile(path2);
  ASSERT_TRUE(bytes2.ok());
  EXPECT_EQ(*bytes, *bytes2);
}

TEST(SafetensorsTest, WriteRejectsDataSizeMismatch) {
  ScopedTempDir dir;
  const std::string path = dir.File("bad.safetensors");
  absl::Status s = WriteSafetensors(path, {{"w", DType::kF32, {2, 2}, F32Bytes({1, 2, 3})}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr(path));
  EXPECT_THAT(s.message(), HasSubstr("tensor 'w'"));
  EXPECT_FALSE(FileExists(path));

  s = WriteSafetensors(path, {{"q", DType::kI8, {2}, "ab"}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("tensor 'q' has unsupported dtype"));

  s = WriteSafetensors(
      path, {{"d", DType::kF32, {1}, F32Bytes({1})}, {"d", DType::kF32, {1}, F32Bytes({1})}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("'d'"));
}

TEST(SafetensorsTest, TruncatedFile) {
  ScopedTempDir dir;
  const std::string path = WriteRaw(dir, "t.safetensors", "abc");
  ExpectOpenError(path, "truncated: 3 bytes, need at least 8");
  ExpectOpenError(WriteRaw(dir, "e.safetensors", ""), "truncated: 0 bytes");
}

TEST(SafetensorsTest, HeaderLengthPastEndOfFile) {
  ScopedTempDir dir;
  std::string bytes = RawFile("{}", "");
  bytes[0] = 100;  // claims a 100-byte header in a 10-byte file
  const std::string path = WriteRaw(dir, "h.safetensors", bytes);
  ExpectOpenError(path, "header length 100 runs past end of file (size 10)");
  std::string huge(8, '\xff');
  ExpectOpenError(WriteRaw(dir, "huge.safetensors", huge + "{}"),
                  "header length 18446744073709551615 runs past end of file");
}

TEST(SafetensorsTest, MalformedHeaderJson) {
  ScopedTempDir dir;
  ExpectOpenError(WriteRaw(dir, "m.safetensors", RawFile(R"({"w": {"dtype": )", "")),
                  "header is not valid JSON");
  ExpectOpenError(WriteRaw(dir, "a.safetensors", RawFile("[1, 2]", "")),
                  "header is not a JSON object");
  ExpectOpenError(WriteRaw(dir, "e.safetensors", RawFile(R"({"w": 3})", "")),
                  "tensor 'w' entry is not a JSON object");
  ExpectOpenError(
      WriteRaw(dir, "s.safetensors",
               RawFile(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})",
                       std::string(4, '\0'))),
      "tensor 'w' has an invalid shape");
  ExpectOpenError(WriteRaw(dir, "o.safetensors",
                           RawFile(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
                                   std::string(4, '\0'))),
                  "tensor 'w' has invalid 'data_offsets'");
  ExpectOpenError(WriteRaw(dir, "d.safetensors",
                           RawFile(R"({"w": {"dtype": 5, "shape": [1], "data_offsets": [0, 4]}})",
                                   std::string(4, '\0'))),
                  "tensor 'w' has no string 'dtype'");
  ExpectOpenError(WriteRaw(dir, "md.safetensors", RawFile(R"({"__metadata__": {"k": 1}})", "")),
                  "__metadata__ entry 'k' is not a string");
}

TEST(SafetensorsTest, OutOfBoundsOffsets) {
  ScopedTempDir dir;
  const std::string path =
      WriteRaw(dir, "oob.safetensors",
               RawFile(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}})",
                       std::string(16, '\0')));
  ExpectOpenError(path, "tensor 'w' data_offsets [8, 24] out of bounds");
  ExpectOpenError(
      WriteRaw(dir, "rev.safetensors",
               RawFile(R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}})",
                       std::string(16, '\0'))),
      "tensor 'w' has data_offsets [8, 4] with begin > end");
}

TEST(SafetensorsTest, OverlappingOffsets) {
  ScopedTempDir dir;
  const std::string path =
      WriteRaw(dir, "ov.safetensors",
               RawFile(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "b": {"dtype": "F16", "shape": [4], "data_offsets": [12, 20]},
                  "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})",
                       std::string(24, '\0')));
  ExpectOpenError(path, "tensors 'a' and 'b' overlap");

  // An empty tensor "inside" another owns no bytes, so that alone is fine.
  const std::string ok_path =
      WriteRaw(dir, "ok.safetensors",
               RawFile(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                  "z": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}})",
                       std::string(16, '\0')));
  EXPECT_TRUE(SafetensorsFile::Open(ok_path).ok());
}

TEST(SafetensorsTest, ByteSizeMismatch) {
  ScopedTempDir dir;
  const std::string path =
      WriteRaw(dir, "bs.safetensors",
               RawFile(R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 16]}})",
                       std::string(16, '\0')));
  ExpectOpenError(path, "tensor 'w' byte size mismatch");
  ExpectOpenError(WriteRaw(dir, "ovf.safetensors",
                           RawFile(R"({"w": {"dtype": "F32",
                                 "shape": [4294967296, 4294967296, 4294967296],
                                 "data_offsets": [0, 16]}})",
                                   std::string(16, '\0'))),
                  "tensor 'w' shape [4294967296, 4294967296, 4294967296] is too large");
}

TEST(SafetensorsTest, UnsupportedDtype) {
  ScopedTempDir dir;
  const std::string path =
      WriteRaw(dir, "i64.safetensors",
               RawFile(R"({"ids": {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}})",
                       std::string(16, '\0')));
  ExpectOpenError(path, "tensor 'ids' has unsupported dtype 'I64'");
}

// Writes a 2-shard folder with an index; `index_override` replaces the index text.
void WriteShardedFolder(const ScopedTempDir& dir, const std::string& index_override = "") {
  ASSERT_TRUE(WriteSafetensors(dir.File("model-00001-of-00002.safetensors"),
                               {{"embed", DType::kF32, {2, 2}, F32Bytes({1, 2, 3, 4})},
                                {"layer0.w", DType::kBF16, {2}, U16Bytes({1, 2})}})
                  .ok());
  ASSERT_TRUE(WriteSafetensors(dir.File("model-00002-of-00002.safetensors"),
                               {{"layer1.w", DType::kF16, {3}, U16Bytes({7, 8, 9})}})
                  .ok());
  const std::string index = index_override.empty() ? R"({
    "metadata": {"total_size": 32},
    "weight_map": {"embed": "model-00001-of-00002.safetensors",
                   "layer0.w": "model-00001-of-00002.safetensors",
                   "layer1.w": "model-00002-of-00002.safetensors"}})"
                                                   : index_override;
  ASSERT_TRUE(WriteFile(dir.File("model.safetensors.index.json"), index).ok());
}

TEST(SafetensorsWeightStoreTest, SingleFile) {
  ScopedTempDir dir;
  ASSERT_TRUE(WriteSafetensors(dir.File("model.safetensors"),
                               {{"w", DType::kF32, {1, 2}, F32Bytes({3, 4})}})
                  .ok());
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_TRUE(ws.ok()) << ws.status();
  EXPECT_EQ((*ws)->dir(), dir.path());
  EXPECT_TRUE((*ws)->Has("w"));
  EXPECT_FALSE((*ws)->Has("x"));
  EXPECT_THAT((*ws)->Names(), ElementsAre("w"));
  absl::StatusOr<TensorInfo> t = (*ws)->Get("w", {1, 2});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(SpanBytes(*t), F32Bytes({3, 4}));
}

TEST(SafetensorsWeightStoreTest, ShardedWithIndex) {
  ScopedTempDir dir;
  WriteShardedFolder(dir);
  // A stray single file is ignored when an index exists.
  ASSERT_TRUE(WriteFile(dir.File("model.safetensors"), "junk").ok());
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_TRUE(ws.ok()) << ws.status();
  EXPECT_THAT((*ws)->Names(), ElementsAre("embed", "layer0.w", "layer1.w"));
  absl::StatusOr<TensorInfo> t = (*ws)->Get("layer1.w", {3});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->dtype, DType::kF16);
  EXPECT_EQ(SpanBytes(*t), U16Bytes({7, 8, 9}));
  EXPECT_THAT(t->file, HasSubstr("model-00002-of-00002.safetensors"));
  t = (*ws)->Get("embed", {2, 2});
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(SpanBytes(*t), F32Bytes({1, 2, 3, 4}));
}

TEST(SafetensorsWeightStoreTest, IndexNamesWrongShard) {
  ScopedTempDir dir;
  WriteShardedFolder(dir, R"({"weight_map": {
      "embed": "model-00001-of-00002.safetensors",
      "layer0.w": "model-00002-of-00002.safetensors",
      "layer1.w": "model-00002-of-00002.safetensors"}})");
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_FALSE(ws.ok());
  EXPECT_EQ(ws.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ws.status().message(), HasSubstr("model.safetensors.index.json"));
  EXPECT_THAT(ws.status().message(), HasSubstr("tensor 'layer0.w'"));
  EXPECT_THAT(ws.status().message(), HasSubstr("model-00002-of-00002.safetensors"));
}

TEST(SafetensorsWeightStoreTest, IndexProblems) {
  {
    ScopedTempDir dir;  // shard named by the index does not exist
    WriteShardedFolder(dir, R"({"weight_map": {"embed": "model-00009.safetensors"}})");
    absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
    ASSERT_FALSE(ws.ok());
    EXPECT_EQ(ws.status().code(), absl::StatusCode::kNotFound);
    EXPECT_THAT(ws.status().message(), HasSubstr("model-00009.safetensors"));
  }
  {
    ScopedTempDir dir;  // tensor in a shard but not listed
    WriteShardedFolder(dir, R"({"weight_map": {
        "embed": "model-00001-of-00002.safetensors",
        "layer1.w": "model-00002-of-00002.safetensors"}})");
    absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
    ASSERT_FALSE(ws.ok());
    EXPECT_EQ(ws.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ws.status().message(), HasSubstr("tensor 'layer0.w'"));
    EXPECT_THAT(ws.status().message(), HasSubstr("not listed"));
  }
  {
    ScopedTempDir dir;  // path escapes the folder
    WriteShardedFolder(dir, R"({"weight_map": {"embed": "../model.safetensors"}})");
    absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
    ASSERT_FALSE(ws.ok());
    EXPECT_EQ(ws.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ws.status().message(), HasSubstr("not a plain file name"));
  }
  {
    ScopedTempDir dir;  // malformed index
    WriteShardedFolder(dir, R"({"weight_map": [1]})");
    absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
    ASSERT_FALSE(ws.ok());
    EXPECT_EQ(ws.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(ws.status().message(), HasSubstr("model.safetensors.index.json"));
  }
}

TEST(SafetensorsWeightStoreTest, DuplicateTensorAcrossShards) {
  ScopedTempDir dir;
  ASSERT_TRUE(
      WriteSafetensors(dir.File("s1.safetensors"), {{"w", DType::kF32, {1}, F32Bytes({1})}}).ok());
  ASSERT_TRUE(
      WriteSafetensors(dir.File("s2.safetensors"), {{"w", DType::kF32, {1}, F32Bytes({2})}}).ok());
  ASSERT_TRUE(WriteFile(dir.File("model.safetensors.index.json"),
                        R"({"weight_map": {"w": "s1.safetensors", "x": "s2.safetensors"}})")
                  .ok());
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_FALSE(ws.ok());
  EXPECT_EQ(ws.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(ws.status().message(), HasSubstr("tensor 'w' appears in both"));
}

TEST(SafetensorsWeightStoreTest, NoWeightsIsNotFound) {
  ScopedTempDir dir;
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_FALSE(ws.ok());
  EXPECT_EQ(ws.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(ws.status().message(),
              HasSubstr(dir.path() + ": no model.safetensors or model.safetensors.index.json"));
}

TEST(SafetensorsWeightStoreTest, MissingTensor) {
  ScopedTempDir dir;
  ASSERT_TRUE(
      WriteSafetensors(dir.File("model.safetensors"), {{"w", DType::kF32, {1}, F32Bytes({1})}})
          .ok());
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_TRUE(ws.ok()) << ws.status();
  absl::StatusOr<TensorInfo> t = (*ws)->Get("lm_head.weight", {1});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(t.status().message(), dir.path() + ": tensor 'lm_head.weight' missing");
}

TEST(SafetensorsWeightStoreTest, ShapeNotMatchingExpected) {
  ScopedTempDir dir;
  const std::string path = dir.File("model.safetensors");
  ASSERT_TRUE(
      WriteSafetensors(path, {{"w", DType::kF32, {2, 3}, F32Bytes({1, 2, 3, 4, 5, 6})}}).ok());
  absl::StatusOr<std::unique_ptr<WeightStore>> ws = WeightStore::Open(dir.path());
  ASSERT_TRUE(ws.ok()) << ws.status();
  absl::StatusOr<TensorInfo> t = (*ws)->Get("w", {3, 2});
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t.status().message(), path + ": tensor 'w' has shape [2, 3], expected [3, 2]");
}

TEST(SafetensorsTest, RandomAndCorruptedInputsNeverCrash) {
  ScopedTempDir dir;
  const std::string valid_path = dir.File("valid.safetensors");
  ASSERT_TRUE(WriteSafetensors(valid_path,
                               {{"a", DType::kF32, {2, 2}, F32Bytes({1, 2, 3, 4})},
                                {"b", DType::kBF16, {3}, U16Bytes({1, 2, 3})},
                                {"c", DType::kF16, {1, 1}, U16Bytes({9})}},
                               {{"format", "pt"}})
                  .ok());
  absl::StatusOr<std::string> valid = ReadFile(valid_path);
  ASSERT_TRUE(valid.ok());

  std::mt19937 rng(12345);
  const std::string path = dir.File("fuzz.safetensors");
  int opened = 0;
  for (int iter = 0; iter < 600; ++iter) {
    std::string bytes;
    switch (iter % 3) {
      case 0: {  // random bytes, sometimes with a plausible header length
        bytes.resize(rng() % 64);
        for (char& c : bytes) c = static_cast<char>(rng());
        if (bytes.size() >= 8 && rng() % 2) {
          uint64_t n = rng() % (bytes.size() - 7);
          for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xff);
        }
        break;
      }
      case 1:  // truncation of a valid file
        bytes = valid->substr(0, rng() % (valid->size() + 1));
        break;
      case 2: {  // a few random byte flips in a valid file
        bytes = *valid;
        int flips = 1 + rng() % 4;
        for (int k = 0; k < flips; ++k) {
          bytes[rng() % bytes.size()] = static_cast<char>(rng());
        }
        break;
      }
    }
    ASSERT_TRUE(WriteFile(path, bytes).ok());
    absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
    if (f.ok()) {
      ++opened;
      // Whatever opened must be internally consistent and readable.
      for (const auto& [name, t] : (*f)->tensors()) {
        ASSERT_EQ(t.nbytes, static_cast<size_t>(t.numel()) * kernels::DTypeSize(t.dtype));
        volatile char sink = 0;
        for (size_t i = 0; i < t.nbytes; ++i) sink ^= static_cast<const char*>(t.data)[i];
        (void)sink;
      }
    } else {
      EXPECT_THAT(f.status().message(), HasSubstr(path));
    }
  }
  EXPECT_GT(opened, 0);  // some flips land in padding or data
}

}  // namespace
}  // namespace kvrelay::model
