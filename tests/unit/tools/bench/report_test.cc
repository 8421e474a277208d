#include "tools/bench/report.h"

#include <png.h>

#include <cstdio>
#include <set>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/testing/temp_dir.h"

namespace kvrelay::bench {
namespace {

using ::testing::HasSubstr;

struct Png {
  bool ok = false;
  uint32_t width = 0, height = 0;
  size_t distinct_colors = 0;
  double non_background = 0;  // fraction of pixels unlike the top-left one
};

// Opens and decodes a PNG with libpng.
Png ReadPng(const std::string& path) {
  Png out;
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) return out;
  image.format = PNG_FORMAT_RGB;
  std::vector<uint8_t> px(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, px.data(), 0, nullptr)) return out;
  out.ok = true;
  out.width = image.width;
  out.height = image.height;
  std::set<uint32_t> colors;
  size_t other = 0;
  const uint32_t bg = px[0] << 16 | px[1] << 8 | px[2];
  for (size_t i = 0; i + 2 < px.size(); i += 3) {
    const uint32_t c = px[i] << 16 | px[i + 1] << 8 | px[i + 2];
    colors.insert(c);
    other += c != bg;
  }
  out.distinct_colors = colors.size();
  out.non_background = static_cast<double>(other) / (image.width * image.height);
  return out;
}

Point MakePoint(const std::string& label, int n, double ttft_ms) {
  Point p;
  p.label = label;
  p.request_rate = std::numeric_limits<double>::infinity();
  p.max_concurrency = 2;
  for (int i = 0; i < n; ++i) {
    RequestRecord r;
    r.index = i;
    r.ok = true;
    r.input_tokens = 50;
    r.start_seconds = i * 0.1;
    std::vector<std::pair<double, int>> msgs;
    for (int t = 0; t < 8; ++t)
      msgs.push_back({r.start_seconds + ttft_ms / 1e3 * (1 + i % 3) + t * 0.01, 1});
    ComputeLatencies(r.start_seconds, msgs, msgs.back().first + 0.001, &r);
    p.run.records.push_back(r);
  }
  p.run.duration_seconds = p.run.records.back().start_seconds + p.run.records.back().e2e_seconds;
  p.summary = Summarize(p.run.records, p.run.duration_seconds, Slo());
  return p;
}

TEST(ReportTest, PlotsAreRealImages) {
  testing::ScopedTempDir tmp;
  std::vector<std::string> pngs;
  const std::vector<Point> points = {MakePoint("concurrency=1", 30, 20),
                                     MakePoint("concurrency=2", 30, 40)};
  absl::Status s = WritePlots(points, tmp.path() + "/plots", &pngs);
  ASSERT_TRUE(s.ok()) << s;
  ASSERT_EQ(pngs.size(), 4u);  // two CDFs, throughput over time, latency vs throughput
  for (const std::string& path : pngs) {
    const Png png = ReadPng(path);
    ASSERT_TRUE(png.ok) << path;
    EXPECT_GE(png.width, 900u) << path;
    EXPECT_GE(png.height, 500u) << path;
    EXPECT_GT(png.distinct_colors, 4u) << path;  // axes, text and two series
    EXPECT_GT(png.non_background, 0.005) << path;
  }
  // One point: no sweep figure.
  ASSERT_TRUE(WritePlots({points[0]}, tmp.path() + "/one", &pngs).ok());
  EXPECT_EQ(pngs.size(), 3u);
}

TEST(ReportTest, MissingGnuplotIsOneClearError) {
  testing::ScopedTempDir tmp;
  ::setenv("KVRELAY_GNUPLOT", "/nonexistent/gnuplot", 1);
  absl::Status s = WritePlots({MakePoint("p", 3, 10)}, tmp.path() + "/x");
  ::unsetenv("KVRELAY_GNUPLOT");
  EXPECT_FALSE(s.ok());
}

TEST(ReportTest, TableAndJsonAgreeWithTheSummary) {
  const Point p = MakePoint("rate=inf", 10, 30);
  std::ostringstream out;
  absl::StatusOr<Slo> slo = ParseSlo("ttft=75");
  ASSERT_TRUE(slo.ok());
  PrintSummary(p, *slo, out);
  EXPECT_THAT(out.str(), HasSubstr("Successful requests:                     10"));
  EXPECT_THAT(out.str(), HasSubstr("Goodput (req/s) [ttft<=75ms]:"));
  std::ostringstream table;
  PrintSweepTable({p, p}, *slo, table);
  EXPECT_THAT(table.str(), HasSubstr("rate=inf"));
  const nlohmann::ordered_json j = ReportJson({{"dataset", "random"}}, {p}, *slo);
  ASSERT_EQ(j["points"].size(), 1u);
  const auto& pj = j["points"][0];
  EXPECT_EQ(pj["requests"].size(), 10u);
  EXPECT_EQ(pj["summary"]["completed"], 10);
  EXPECT_EQ(pj["summary"]["output_tokens"], 80);
  EXPECT_EQ(pj["summary"]["slo"]["ttft_ms"], 75.0);
  EXPECT_EQ(pj["requests"][0]["itl_s"].size(), 7u);
}

}  // namespace
}  // namespace kvrelay::bench
