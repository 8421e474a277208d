#include "router/api_keys.h"

#include <cstdio>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::router {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

std::string WriteFile(const std::string& name, const std::string& text) {
  const std::string path = ::testing::TempDir() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

TEST(ApiKeysTest, NoKeysAllowsEverything) {
  ApiKeys keys;
  EXPECT_TRUE(keys.empty());
  EXPECT_TRUE(keys.Allows(""));
  EXPECT_TRUE(keys.Allows("Bearer whatever"));
}

TEST(ApiKeysTest, LoadAndAllow) {
  const std::string path =
      WriteFile("keys.txt", "# team a\n  sk-one  \n\nsk-two\n# sk-commented\n");
  absl::StatusOr<ApiKeys> keys = ApiKeys::Load(path);
  ASSERT_TRUE(keys.ok()) << keys.status();
  EXPECT_EQ(keys->size(), 2u);
  EXPECT_TRUE(keys->Allows("Bearer sk-one"));
  EXPECT_TRUE(keys->Allows("bearer sk-two"));
  EXPECT_TRUE(keys->Allows("  BEARER   sk-two  "));
  EXPECT_FALSE(keys->Allows("Bearer sk-commented"));
  EXPECT_FALSE(keys->Allows("sk-one"));  // no scheme
  EXPECT_FALSE(keys->Allows("Basic sk-one"));
  EXPECT_FALSE(keys->Allows("Bearer sk-on"));
  EXPECT_FALSE(keys->Allows("Bearer "));
  EXPECT_FALSE(keys->Allows(""));
}

TEST(ApiKeysTest, BadFilesNameTheLineNotTheKey) {
  EXPECT_EQ(ApiKeys::Load(::testing::TempDir() + "/nope/keys").status().code(),
            absl::StatusCode::kNotFound);
  const absl::Status empty = ApiKeys::Load(WriteFile("empty.txt", "# nothing\n\n")).status();
  EXPECT_EQ(empty.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(empty.message(), HasSubstr("has no keys"));
  const absl::Status space =
      ApiKeys::Load(WriteFile("space.txt", "sk-fine\nsk-secret part\n")).status();
  EXPECT_EQ(space.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(space.message(), HasSubstr(":2:"));
  EXPECT_THAT(space.message(), Not(HasSubstr("sk-secret")));
}

}  // namespace
}  // namespace kvrelay::router
