#include "common/util/file.h"

#include "gtest/gtest.h"

namespace kvrelay {
namespace {

std::string Tmp() {
  std::string d = ::testing::TempDir();
  return JoinPath(d, "kvr_file_test");
}

TEST(FileTest, WriteReadMap) {
  const std::string dir = JoinPath(Tmp(), "a/b");
  ASSERT_TRUE(MakeDirs(dir).ok());
  EXPECT_TRUE(IsDirectory(dir));
  const std::string f = JoinPath(dir, "x.bin");
  ASSERT_TRUE(WriteFile(f, std::string("hello\0world", 11)).ok());
  auto s = ReadFile(f);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(*s, std::string("hello\0world", 11));
  auto m = MappedFile::Open(f);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->size(), 11u);
  EXPECT_EQ(std::string(m->data(), 5), "hello");
  MappedFile moved = std::move(*m);
  EXPECT_EQ(moved.size(), 11u);
}

TEST(FileTest, MissingFilesNameThePath) {
  auto s = ReadFile("/nonexistent/kvr/file");
  EXPECT_EQ(s.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(s.status().message().find("/nonexistent/kvr/file"), std::string::npos);
  auto m = MappedFile::Open("/nonexistent/kvr/file");
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_FALSE(FileExists("/nonexistent/kvr/file"));
}

TEST(FileTest, EmptyFileMaps) {
  const std::string f = JoinPath(::testing::TempDir(), "kvr_empty");
  ASSERT_TRUE(WriteFile(f, "").ok());
  auto m = MappedFile::Open(f);
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->size(), 0u);
}

TEST(FileTest, BaseName) {
  EXPECT_EQ(BaseName("/m/llama"), "llama");
  EXPECT_EQ(BaseName("/m/llama//"), "llama");
  EXPECT_EQ(BaseName("llama"), "llama");
  EXPECT_EQ(BaseName("/"), "/");
  EXPECT_EQ(BaseName(""), "");
}

TEST(FileTest, JoinPath) {
  EXPECT_EQ(JoinPath("a", "b"), "a/b");
  EXPECT_EQ(JoinPath("a/", "b"), "a/b");
  EXPECT_EQ(JoinPath("", "b"), "b");
}

}  // namespace
}  // namespace kvrelay
