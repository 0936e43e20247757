// `multipole bench attention`, run as the built binary on tiny shapes.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "io/temp_dir.hpp"

using multipole::test_util::TempDir;
using json = nlohmann::json;

namespace {

struct BenchRun {
  int code = -1;  // -1: killed by a signal
  std::string out, err;
};

BenchRun bench(const std::string& args, const std::string& command = "bench attention") {
  TempDir dir;
  const std::string out = dir.file("out"), err = dir.file("err");
  const int status =
      std::system((std::string(MULTIPOLE_CLI_PATH) + " " + command + " " + args + " >" + out + " 2>" + err).c_str());
  BenchRun r;
  if (WIFEXITED(status) && WEXITSTATUS(status) < 128) r.code = WEXITSTATUS(status);
  std::stringstream o, e;
  o << std::ifstream(out).rdbuf();
  e << std::ifstream(err).rdbuf();
  r.out = o.str();
  r.err = e.str();
  return r;
}

const std::string kSmall = "--q-heads 8 --kv-heads 2 --head-dim 64 --steps 2 --threads 2 --copy-mib 4";

}  // namespace

TEST(BenchCli, JsonRowsPerContextBatchAndPolicy) {
  BenchRun r = bench(kSmall + " --context 300,700 --batch 1,2 --policies quest,dense,oracle-topk --budget 32 --json");
  ASSERT_EQ(r.code, 0) << r.err;
  std::vector<json> rows;
  std::istringstream lines(r.out);
  for (std::string line; std::getline(lines, line);) rows.push_back(json::parse(line));
  ASSERT_EQ(rows.size(), 1u + 2 * 2 * 3);
  EXPECT_EQ(rows[0]["bench"], "memcpy");
  EXPECT_GT(rows[0]["gb_per_s"].get<double>(), 0);
  EXPECT_GT(rows[0]["read_gb_per_s"].get<double>(), 0);
  for (size_t i = 1; i < rows.size(); ++i) {
    const json& j = rows[i];
    SCOPED_TRACE(j.dump());
    EXPECT_EQ(j["bench"], "attention");
    const std::vector<std::string> order = {"dense", "quest", "oracle-topk"};  // dense first
    EXPECT_EQ(j["policy"], order[(i - 1) % 3]);
    EXPECT_GT(j["us_per_step"].get<double>(), 0);
    // %copy is against the copy timed after this row's own steps.
    ASSERT_GT(j["copy_gb_per_s"].get<double>(), 0);
    EXPECT_NEAR(j["pct_of_copy_bandwidth"].get<double>(),
                100 * j["gb_per_s"].get<double>() / j["copy_gb_per_s"].get<double>(), 1e-6);
    EXPECT_GE(j["generated_tokens"].get<int64_t>(), 256);  // >= 2W for the update's amortised cost
    const int64_t batch = j["batch"], context = j["context"];
    const int64_t exact = j["exact_tokens"], selected = j["selected_tokens"], bytes = j["bytes_per_step"];
    EXPECT_LE(selected, 32 * 2 * batch);
    if (j["policy"] == "dense") {
      EXPECT_DOUBLE_EQ(j["speedup_vs_dense"].get<double>(), 1.0);
      // Every cached token of both KV heads, bf16 K and V: 2 x 64 x 2 bytes each.
      EXPECT_GT(exact, 2 * batch * context);
      EXPECT_NEAR(double(bytes), double(exact) * 256, 256);
    }
  }
}

TEST(BenchCli, TableAndErrors) {
  BenchRun r = bench(kSmall + " --context 200 --policies dense");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("x dense"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("plain copy"), std::string::npos) << r.out;
  for (auto [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"--device tpu", "--device 'tpu' must be cpu or cuda"},
           {"--simd sse", "--simd 'sse' is not one of auto, avx2, avx512"},
           {"--policies nope", "unknown policy 'nope'"},
           {"--context 0", "context 0 must be > 0"},
           {"--kv-dtype f8", "unknown dtype"},
           {"--tokens-per-centroid 16,8", "must exceed the finer level"}}) {
    BenchRun e = bench(kSmall + " " + args);
    EXPECT_EQ(e.code, 1) << args << "\n" << e.err;
    EXPECT_NE(e.err.find(message), std::string::npos) << args << "\n" << e.err;
  }
  BenchRun e = bench("--q-heads 12 --kv-heads 8 --context 100 --copy-mib 4");
  EXPECT_EQ(e.code, 1) << e.err;
  EXPECT_NE(e.err.find("num_q_heads 12"), std::string::npos) << e.err;
}

// The GPU bench's options are checked before it looks for a device (none in CI). A build without
// CUDA has no bench-cuda: skipped there, as the other Cuda* tests are.
TEST(CudaBenchCli, OptionsCheckedBeforeTheDevice) {
  if (bench("--help", "").out.find("bench-cuda") == std::string::npos) GTEST_SKIP() << "a build without CUDA";
  for (const auto& [args, message] : std::vector<std::pair<std::string, std::string>>{
           {"--budget 128 --rerank-tokens 100", "--rerank-tokens 100 must be 0 (4 x the budget) or above --budget 128"},
           {"--batch 1 0", "batch 0 must be > 0"},
           {"--context 0", "context 0 must be > 0"},
           {"--head-dim 96", "--head-dim 96 must be 64 or 128"},
           {"--q-heads 12 --kv-heads 8", "num_q_heads 12 must be a positive multiple of num_kv_heads 8"},
           {"--tokens-per-centroid 0", "tokens_per_centroid[0] = 0"}}) {
    BenchRun e = bench(args, "bench-cuda");
    EXPECT_EQ(e.code, 1) << args << "\n" << e.err;
    EXPECT_NE(e.err.find(message), std::string::npos) << args << "\n" << e.err;
  }
  // The same checks behind `bench attention --device cuda`.
  BenchRun e = bench("--device cuda --batch 0");
  EXPECT_EQ(e.code, 1) << e.err;
  EXPECT_NE(e.err.find("batch 0 must be > 0"), std::string::npos) << e.err;
}
