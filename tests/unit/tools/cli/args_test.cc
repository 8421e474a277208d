#include "tools/cli/args.h"

#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kvrelay::cli {
namespace {

using ::testing::HasSubstr;

absl::Status Parse(Args& a, std::vector<std::string> argv) {
  static std::vector<std::string> keep;
  keep = std::move(argv);
  std::vector<char*> p;
  for (auto& s : keep) p.push_back(s.data());
  return a.Parse(static_cast<int>(p.size()), p.data(), 0);
}

Args Make() {
  Args a;
  a.Flag("name", Args::Kind::kString, "a string")
      .Flag("n", Args::Kind::kInt, "an int")
      .Flag("x", Args::Kind::kFloat, "a float")
      .Flag("json", Args::Kind::kBool, "a bool")
      .Flag("prompt", Args::Kind::kString, "repeatable", true);
  return a;
}

TEST(ArgsTest, ParsesAllForms) {
  Args a = Make();
  ASSERT_TRUE(
      Parse(a, {"--name", "v", "--n=3", "--x", "0.5", "--json", "--prompt", "a, b", "--prompt=c"})
          .ok());
  EXPECT_EQ(a.GetString("name", ""), "v");
  EXPECT_EQ(a.GetInt("n", 0), 3);
  EXPECT_DOUBLE_EQ(a.GetFloat("x", 0), 0.5);
  EXPECT_TRUE(a.GetBool("json"));
  EXPECT_EQ(a.GetAll("prompt"), (std::vector<std::string>{"a, b", "c"}));
  EXPECT_EQ(a.GetInt("missing", 7), 7);
  EXPECT_THAT(a.Help(), HasSubstr("--prompt"));
}

TEST(ArgsTest, ErrorsNameTheFlag) {
  Args a = Make();
  EXPECT_THAT(Parse(a, {"--nope"}).message(), HasSubstr("unknown flag --nope"));
  a = Make();
  EXPECT_THAT(Parse(a, {"--n", "three"}).message(), HasSubstr("--n takes an integer"));
  a = Make();
  EXPECT_THAT(Parse(a, {"--x=abc"}).message(), HasSubstr("--x takes a number"));
  a = Make();
  EXPECT_THAT(Parse(a, {"--name"}).message(), HasSubstr("--name needs a value"));
  a = Make();
  EXPECT_THAT(Parse(a, {"--name", "a", "--name", "b"}).message(), HasSubstr("more than once"));
  a = Make();
  EXPECT_THAT(Parse(a, {"positional"}).message(), HasSubstr("unexpected argument"));
  a = Make();
  EXPECT_THAT(Parse(a, {"--json=maybe"}).message(), HasSubstr("true or false"));
}

}  // namespace
}  // namespace kvrelay::cli
