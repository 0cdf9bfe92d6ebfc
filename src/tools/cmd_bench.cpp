// `diffuse bench ops`: op throughput as JSON on stdout (a human summary goes to stderr).
// Median of repeats after one warm-up; compare figures as ratios within one run (shared machines).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/profiling.h"
#include "core/error.h"
#include "core/threads.h"
#include "tools/bench_pipeline.h"
#include "tools/commands.h"

namespace diffuse::tools {
namespace {

struct BenchOptions {
  std::string what = "pipeline";
  int repeats = 7;
  int threads = 0;
  std::string precision;  // ops: "both" unless given; pipeline: "auto"
  std::string filter;
  int lora_rank = 16;
  std::string checkpointing = "both";  // train
};

Tensor random_tensor(const Shape& s, DType dt, uint32_t seed) { return random_normal(s, dt, seed); }

double median_ms(const std::function<void()>& fn, int repeats) {
  fn();  // warm-up: primitive creation, weight reorder, page faults
  std::vector<double> ms;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    auto t1 = std::chrono::steady_clock::now();
    ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct OpCase {
  std::string op, shape;
  double flop;
  std::function<std::function<void()>(Backend&, DType)> setup;  // returns the timed body
};

std::vector<OpCase> op_cases() {
  std::vector<OpCase> cases;
  auto conv = [](int n, int hw, int ci, int co) {
    return OpCase{"conv2d_3x3",
                  cat("x[", n, ",", hw, ",", hw, ",", ci, "] nhwc -> ", co, ", 3x3 s1 p1"),
                  2.0 * n * hw * hw * co * ci * 9,
                  [=](Backend& be, DType act) -> std::function<void()> {
                    auto w = be.prepare_conv2d(random_tensor({co, ci, 3, 3}, DType::F16, 1),
                                               random_tensor({co}, DType::F16, 2), Conv2dParams::same(3));
                    auto x = std::make_shared<Tensor>(random_tensor({n, hw, hw, ci}, act, 3));
                    auto y = std::make_shared<Tensor>(Tensor::empty({n, hw, hw, co}, act));
                    return [&be, w, x, y] { be.conv2d(*x, *w, *y); };
                  }};
  };
  cases.push_back(conv(2, 64, 320, 320));
  cases.push_back(conv(2, 32, 640, 640));
  auto att = [](int b, int n, int heads, int d, int nk) {
    return OpCase{"attention",
                  cat("q[", b, ",", n, ",", heads, "x", d, "] k,v[", b, ",", nk, ",", heads, "x", d, "]"),
                  4.0 * b * heads * double(n) * nk * d,
                  [=](Backend& be, DType act) -> std::function<void()> {
                    auto q = std::make_shared<Tensor>(random_tensor({b, n, heads * d}, act, 4));
                    auto k = std::make_shared<Tensor>(random_tensor({b, nk, heads * d}, act, 5));
                    auto v = std::make_shared<Tensor>(random_tensor({b, nk, heads * d}, act, 6));
                    auto o = std::make_shared<Tensor>(Tensor::empty({b, n, heads * d}, act));
                    float scale = 1.0f / std::sqrt(float(d));
                    return [&be, q, k, v, o, heads, scale] { be.attention(*q, *k, *v, heads, scale, *o); };
                  }};
  };
  cases.push_back(att(2, 4096, 8, 40, 4096));
  cases.push_back(att(2, 4096, 8, 40, 77));
  // The training backward (f32 whatever the precision): FLOPs of dv, dP, dq and dk plus one
  // recomputation of the scores (4·2·N·Nk·d per head); pass 1's score recomputation for the
  // log-sum-exp, where a kernel does it, is not counted.
  auto att_bwd = [](int b, int n, int heads, int d, int nk) {
    return OpCase{"attention_backward",
                  cat("q[", b, ",", n, ",", heads, "x", d, "] k,v[", b, ",", nk, ",", heads, "x", d, "] f32"),
                  10.0 * b * heads * double(n) * nk * d,
                  [=](Backend& be, DType) -> std::function<void()> {
                    auto t = [&](int64_t rows, uint32_t seed) {
                      return std::make_shared<Tensor>(random_tensor({b, rows, int64_t(heads) * d}, DType::F32, seed));
                    };
                    auto q = t(n, 4), k = t(nk, 5), v = t(nk, 6), o = t(n, 7), d_o = t(n, 8);
                    auto dq = t(n, 9), dk = t(nk, 10), dv = t(nk, 11);
                    const float scale = 1.0f / std::sqrt(float(d));
                    be.attention(*q, *k, *v, heads, scale, *o);
                    return [&be, q, k, v, o, d_o, dq, dk, dv, heads, scale] {
                      be.attention_backward(*q, *k, *v, *o, *d_o, heads, scale, *dq, *dk, *dv);
                    };
                  }};
  };
  cases.push_back(att_bwd(1, 4096, 8, 40, 4096));
  cases.push_back(att_bwd(1, 4096, 8, 40, 77));
  cases.push_back(OpCase{"matmul", "[1,4096,1280] x [1,1280,1280]", 2.0 * 4096 * 1280 * 1280,
                         [](Backend& be, DType act) -> std::function<void()> {
                           auto a = std::make_shared<Tensor>(random_tensor({1, 4096, 1280}, act, 7));
                           auto b = std::make_shared<Tensor>(random_tensor({1, 1280, 1280}, act, 8));
                           auto c = std::make_shared<Tensor>(Tensor::empty({1, 4096, 1280}, DType::F32));
                           return [&be, a, b, c] { be.matmul(*a, *b, *c, false, 1.0f); };
                         }});
  cases.push_back(OpCase{"group_norm_silu", "x[2,64,64,320] f32, 32 groups", 0.0,
                         [](Backend& be, DType) -> std::function<void()> {
                           auto x = std::make_shared<Tensor>(random_tensor({2, 64, 64, 320}, DType::F32, 9));
                           auto g = std::make_shared<Tensor>(random_tensor({320}, DType::F32, 10));
                           auto b = std::make_shared<Tensor>(random_tensor({320}, DType::F32, 11));
                           auto y = std::make_shared<Tensor>(Tensor::empty({2, 64, 64, 320}));
                           return [&be, x, g, b, y] { be.group_norm(*x, *g, *b, 32, 1e-5f, true, *y); };
                         }});
  return cases;
}

int bench_ops(const BenchOptions& o) {
  set_num_threads(o.threads);
  std::vector<Precision> precs;
  if (o.precision == "fp32" || o.precision == "both") precs.push_back(Precision::F32);
  if (o.precision == "bf16" || o.precision == "both") precs.push_back(Precision::BF16);
  nlohmann::json ops = nlohmann::json::array();
  std::fprintf(stderr, "diffuse bench ops: %d threads, cpu: %s\n", num_threads(), cpu_features().str().c_str());
  for (Precision p : precs) {
    auto be = make_cpu_backend(p);
    Precision eff = be->effective_precision();
    DType act = eff == Precision::BF16 ? DType::BF16 : DType::F32;
    for (const OpCase& c : op_cases()) {
      if (!o.filter.empty() && c.op.find(o.filter) == std::string::npos) continue;
      auto body = c.setup(*be, act);
      double ms = median_ms(body, o.repeats);
      nlohmann::json j = {{"op", c.op}, {"shape", c.shape}, {"precision", precision_name(eff)},
                          {"activations", dtype_name(act)}, {"ms", std::round(ms * 1000) / 1000}};
      if (c.flop > 0) j["gflops"] = std::round(c.flop / (ms * 1e6) * 10) / 10;
      std::string impl = be->describe(c.op);
      if (!impl.empty()) j["impl"] = impl;
      ops.push_back(j);
      std::fprintf(stderr, "  %-16s %-5s %-44s %9.3f ms %9.1f GFLOP/s  %s\n", c.op.c_str(), precision_name(eff),
                   c.shape.c_str(), ms, c.flop > 0 ? c.flop / (ms * 1e6) : 0.0, impl.c_str());
    }
  }
  nlohmann::json out = {{"threads", num_threads()}, {"omp_wait", omp_wait_setting()}, {"cpu", cpu_features().str()},
                        {"repeats", o.repeats}, {"ops", ops}};
  std::printf("%s\n", out.dump(2).c_str());
  return 0;
}

}  // namespace

Run add_bench_command(CLI::App& app) {
  auto o = std::make_shared<BenchOptions>();
  auto po = std::make_shared<PipelineBenchOptions>();
  CLI::App* cmd = app.add_subcommand(
      "bench", "Benchmarks, JSON on stdout: `diffuse bench --model sd15` (txt2img, full size) or `diffuse bench ops`");
  cmd->add_option("what", o->what,
                  "pipeline (default), ops, quality (fp32 vs bf16 vs int8 latents), lora (LoRA switch vs model load) or "
                  "train (LoRA training step)")
      ->check(CLI::IsMember({"pipeline", "ops", "quality", "lora", "train"}));
  cmd->add_option("--lora-rank", o->lora_rank, "lora, train: LoRA rank (default 16)")->check(CLI::Range(1, 1024));
  cmd->add_option("--repeats", o->repeats, "timed repeats (the median is reported)")->check(CLI::Range(1, 1000));
  cmd->add_option("-t,--threads", o->threads, "threads (default: physical cores)")->check(CLI::Range(0, 1024));
  cmd->add_option("--precision", o->precision, "fp32, bf16, auto (pipeline default) or both (ops default)")
      ->check(CLI::IsMember({"fp32", "bf16", "auto", "both"}));
  cmd->add_option("--checkpointing", o->checkpointing, "train: gradient checkpointing on, off or both (default)")
      ->check(CLI::IsMember({"on", "off", "both"}));
  cmd->add_option("--op", o->filter, "ops: only ops whose name contains this");
  add_pipeline_bench_options(cmd, *po);
  return [o, po] {
    if (o->what == "ops") {
      if (o->precision.empty() || o->precision == "auto") o->precision = "both";
      return bench_ops(*o);
    }
    if (o->what == "quality") return run_quality_bench(*po, o->threads);
    if (o->what == "train") return run_train_bench(*po, o->threads, o->lora_rank, o->precision.empty() || o->precision == "auto" ? "bf16" : o->precision,
                             o->checkpointing);
    if (o->what == "lora")
      return run_lora_bench(*po, o->threads, o->precision.empty() ? "auto" : o->precision, o->lora_rank, o->repeats);
    return run_pipeline_bench(*po, o->threads, o->precision.empty() ? "auto" : o->precision);
  };
}

}  // namespace diffuse::tools
