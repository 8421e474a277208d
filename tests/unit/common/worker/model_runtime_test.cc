// Tests for common/worker/model_runtime: loading the model on the backend --device picks, and
// a KV pool in the backend's own memory.
#include "common/worker/model_runtime.h"

#include <cstdint>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "tests/testing/test_models.h"

namespace kvrelay::worker {
namespace {

using ::testing::HasSubstr;

std::string TinyDir() { return testing::ModelDir(testing::TinyVariants().front()); }

TEST(ModelRuntimeTest, CpuLoadsTheModelOnTheCpuBackend) {
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime(TinyDir(), "cpu", 2);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_NE(r->threads, nullptr);
  EXPECT_EQ(r->threads->num_threads(), 2);
  ASSERT_NE(r->backend, nullptr);
  EXPECT_EQ(r->backend->device(), kernels::Device::kCpu);
  ASSERT_NE(r->model, nullptr);
  EXPECT_EQ(&r->model->backend(), r->backend.get());
  EXPECT_THAT(r->device_note, HasSubstr("cpu"));
}

TEST(ModelRuntimeTest, AutoRunsWhereverTheMachineAllows) {
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime(TinyDir(), "auto", 1);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->backend->device(), kernels::ResolveDevice("auto").value());
  EXPECT_THAT(r->device_note, HasSubstr("auto"));
}

TEST(ModelRuntimeTest, BadFlagsAreInvalidArgumentNamingTheFlag) {
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime(TinyDir(), "gpu0", 1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("--device"));
  r = LoadModelRuntime(TinyDir(), "cpu", -1);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(r.status().message(), HasSubstr("--threads"));
}

TEST(ModelRuntimeTest, CudaWithoutAGpuSaysWhyNotAndNamesTheFlag) {
  std::string why;
  if (kernels::ResolveDevice("auto", &why).value() == kernels::Device::kCuda) {
    GTEST_SKIP() << "a GPU is present: " << why;
  }
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime(TinyDir(), "cuda", 1);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().code(), ::testing::AnyOf(absl::StatusCode::kFailedPrecondition,
                                                  absl::StatusCode::kUnavailable));
  EXPECT_THAT(r.status().message(), HasSubstr("--device cuda"));
}

TEST(ModelRuntimeTest, MissingModelIsTheLoadersError) {
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime("/nonexistent/kvrelay-model", "cpu", 1);
  EXPECT_FALSE(r.ok());
}

TEST(AllocateKvPoolTest, ZeroFilledPoolInTheBackendsMemory) {
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime(TinyDir(), "cpu", 1);
  ASSERT_TRUE(r.ok()) << r.status();
  const kernels::PagedKvLayout layout = r->model->KvLayout(kernels::DType::kF16, 4);
  absl::StatusOr<BackendKvPool> p = AllocateKvPool(*r->backend, layout, 5);
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_NE(p->pool, nullptr);
  EXPECT_EQ(p->pool->num_blocks(), 5);
  EXPECT_EQ(p->pool->view().memory, r->backend->memory_kind());
  EXPECT_EQ(p->pool->view().base, p->memory.data());
  ASSERT_EQ(p->memory.bytes(), layout.block_bytes() * 5);
  const uint8_t* bytes = p->memory.as<uint8_t>();
  int64_t nonzero = 0;
  for (size_t i = 0; i < p->memory.bytes(); ++i) nonzero += bytes[i] != 0;
  EXPECT_EQ(nonzero, 0);
}

TEST(AllocateKvPoolTest, BadGeometryIsInvalidArgument) {
  absl::StatusOr<ModelRuntime> r = LoadModelRuntime(TinyDir(), "cpu", 1);
  ASSERT_TRUE(r.ok()) << r.status();
  const kernels::PagedKvLayout layout = r->model->KvLayout(kernels::DType::kF32, 4);
  for (int64_t n : {int64_t{0}, int64_t{-3}, int64_t{1} << 40}) {
    absl::StatusOr<BackendKvPool> p = AllocateKvPool(*r->backend, layout, n);
    EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
}

}  // namespace
}  // namespace kvrelay::worker
