// Tests for choosing a backend (kernels/create_backend.cc): CreateBackend, ResolveDevice
// ("--device auto|cpu|cuda") and BuiltWithCuda, in builds with and without CUDA, on machines
// with and without a GPU.
#include <pthread.h>

#include <cstring>
#include <memory>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "kernels/cpu/cpu_backend.h"
#include "kernels/thread_pool.h"
#if defined(KVRELAY_HAVE_CUDA)
#include "kernels/cuda/cuda_check.h"
#endif

namespace kvrelay::kernels {
namespace {

using ::testing::HasSubstr;

// Whether this process can use a GPU (never in a build without CUDA).
bool HaveGpu() {
#if defined(KVRELAY_HAVE_CUDA)
  return cuda::CudaAvailable();
#else
  return false;
#endif
}

TEST(CreateBackendTest, CpuBackendOnHostMemory) {
  ThreadPool pool(2);
  for (ThreadPool* p : {&pool, static_cast<ThreadPool*>(nullptr)}) {
    absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(Device::kCpu, p);
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ((*b)->device(), Device::kCpu);
    EXPECT_EQ((*b)->memory_kind(), MemoryKind::kHost);
    auto* cpu = dynamic_cast<CpuBackend*>(b->get());
    ASSERT_NE(cpu, nullptr);
    EXPECT_EQ(cpu->pool(), p);
  }
}

TEST(CreateBackendTest, CudaIsABackendOnDeviceMemoryOrSaysWhyNot) {
  absl::StatusOr<std::unique_ptr<Backend>> b = CreateBackend(Device::kCuda, nullptr);
  if (!BuiltWithCuda()) {
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kFailedPrecondition) << b.status();
    EXPECT_THAT(b.status().message(), HasSubstr("this build has no CUDA backend"));
  } else if (!HaveGpu()) {
    ASSERT_FALSE(b.ok());
    EXPECT_EQ(b.status().code(), absl::StatusCode::kUnavailable) << b.status();
    EXPECT_THAT(b.status().message(), HasSubstr("no usable GPU"));
  } else {
    ASSERT_TRUE(b.ok()) << b.status();
    EXPECT_EQ((*b)->device(), Device::kCuda);
    EXPECT_EQ((*b)->memory_kind(), MemoryKind::kCuda);
  }
}

// Linking the backends must leave room for threads with small stacks: civetweb (the /metrics
// server) starts its threads with 100 KB stacks, and glibc refuses a thread whose stack cannot
// hold the process's static TLS (libcublasLt alone has ~94 KB of it, which is why it is
// dlopen'ed: kernels/cuda/cublaslt_api.h).
TEST(CreateBackendTest, ThreadsWithSmallStacksStillStart) {
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, 100 * 1024), 0);
  pthread_t thread;
  const int err = pthread_create(
      &thread, &attr, [](void*) -> void* { return nullptr; }, nullptr);
  EXPECT_EQ(err, 0) << "pthread_create with a 100 KB stack: " << std::strerror(err);
  if (err == 0) pthread_join(thread, nullptr);
  pthread_attr_destroy(&attr);
}

TEST(ResolveDeviceTest, ExplicitNamesAreTakenAsGiven) {
  std::string why;
  absl::StatusOr<Device> d = ResolveDevice("cpu", &why);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, Device::kCpu);
  EXPECT_THAT(why, HasSubstr("asked for"));
  // Asking for cuda resolves to cuda even without a GPU: CreateBackend then says why not,
  // rather than a worker silently running on the CPU.
  d = ResolveDevice("cuda", &why);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, Device::kCuda);
}

TEST(ResolveDeviceTest, AutoPicksCudaOnlyWithAGpu) {
  std::string why;
  absl::StatusOr<Device> d = ResolveDevice("auto", &why);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(*d, HaveGpu() ? Device::kCuda : Device::kCpu);
  EXPECT_THAT(why, HasSubstr("auto"));
  if (!BuiltWithCuda()) {
    EXPECT_THAT(why, HasSubstr("no CUDA backend"));
  }
  // Without the out-parameter too.
  EXPECT_TRUE(ResolveDevice("auto").ok());
}

TEST(ResolveDeviceTest, AnythingElseIsInvalidArgumentNamingIt) {
  for (const char* bad : {"gpu", "", "CUDA", "cpu "}) {
    absl::StatusOr<Device> d = ResolveDevice(bad);
    ASSERT_FALSE(d.ok()) << bad;
    EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(d.status().message(), HasSubstr("--device"));
    EXPECT_THAT(d.status().message(), HasSubstr(std::string("'") + bad + "'"));
  }
}

}  // namespace
}  // namespace kvrelay::kernels
