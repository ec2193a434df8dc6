// The `qlora` binary's contract for mistakes a user can make: one clear message naming the thing,
// a hint, exit code 2 (never a signal or core dump), and no partial output left behind.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora {
namespace {

using testing_support::qlora_binary;
using testing_support::run_command;
using testing_support::shared_temp_dir;
using testing_support::synthetic_store;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

const char* kMpirun = "mpirun --oversubscribe --allow-run-as-root -np 2 ";

std::string folder_of_nothing() { return shared_temp_dir() + "/no-adapter-here"; }

TEST(CommandLine, UnknownFlagIsExitCodeTwoWithAHint) {
  std::string output;
  EXPECT_EQ(run_command(qlora_binary() + " train --bogus 3", &output), 2) << output;
  EXPECT_TRUE(contains(output, "--bogus")) << output;
  EXPECT_TRUE(contains(output, "hint: see `qlora train --help`")) << output;
  EXPECT_EQ(run_command(qlora_binary() + " frobnicate", &output), 2) << output;
  EXPECT_TRUE(contains(output, "unknown command 'frobnicate'")) << output;
}

TEST(CommandLine, MissingModelEndsEveryRankWithOneMessageAndNoOutputFolder) {
  const std::string out = shared_temp_dir() + "/never-created";
  std::string output;
  EXPECT_EQ(run_command(std::string(kMpirun) + qlora_binary() + " train --model /nonexistent/model.h5 --out " + out,
                        &output),
            2)
      << output;
  EXPECT_TRUE(contains(output, "/nonexistent/model.h5: no such model file")) << output;
  EXPECT_FALSE(contains(output, "Segmentation")) << output;
  EXPECT_FALSE(std::filesystem::exists(out));
}

// The demo model's folder has a predictable name under $TMPDIR: a link planted there, or a folder
// others can write, is refused before anything is written.
TEST(CommandLine, DemoModelFolderMustBePrivate) {
  const std::string user = std::to_string(getuid());
  for (const std::string kind : {"link", "open"}) {
    const std::filesystem::path temporary = std::filesystem::path(shared_temp_dir()) / ("tmpdir-" + kind);
    std::filesystem::remove_all(temporary);
    std::filesystem::create_directories(temporary / "elsewhere");
    const std::filesystem::path demo = temporary / ("qlora-demo-" + user);
    if (kind == "link") {
      std::filesystem::create_directory_symlink(temporary / "elsewhere", demo);
    } else {
      std::filesystem::create_directories(demo);
      std::filesystem::permissions(demo, std::filesystem::perms::all);
    }
    std::string output;
    EXPECT_EQ(run_command("TMPDIR=" + temporary.string() + " " + qlora_binary() + " plan", &output), 2) << output;
    EXPECT_TRUE(contains(output, "the demo model's folder " + demo.string())) << output;
    EXPECT_TRUE(contains(output, kind == "link" ? "is not a folder" : "writable by others")) << output;
    EXPECT_TRUE(std::filesystem::is_empty(temporary / "elsewhere")) << kind;
  }
}

TEST(CommandLine, MissingOrEmptyDataIsAUserError) {
  const std::string model = synthetic_store("micro");
  const std::string out = shared_temp_dir() + "/never-created-data";
  std::string output;
  EXPECT_EQ(run_command(qlora_binary() + " train --model " + model + " --data /nonexistent/corpus --out " + out, &output),
            2)
      << output;
  EXPECT_TRUE(contains(output, "no such data file or folder: /nonexistent/corpus")) << output;
  const std::string empty_folder = shared_temp_dir() + "/empty-corpus";
  std::filesystem::create_directories(empty_folder);
  EXPECT_EQ(run_command(qlora_binary() + " train --model " + model + " --data " + empty_folder + " --out " + out, &output),
            2)
      << output;
  EXPECT_TRUE(contains(output, "holds no non-empty .txt")) << output;
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(CommandLine, WorldLargerThanTheQuantizationBlocksOfATensorIsRefused) {
  // micro's k_proj holds 32 x 64 = 2048 weights: one block of 4096, so two ranks cannot share it.
  const std::string model = synthetic_store("micro", 4096);
  const std::string out = shared_temp_dir() + "/never-created-world";
  std::string output;
  EXPECT_EQ(run_command(std::string(kMpirun) + qlora_binary() + " train --model " + model + " --out " + out, &output), 2)
      << output;
  EXPECT_TRUE(contains(output, "world size 2 is larger than the 1 quantization blocks of tensor")) << output;
  EXPECT_TRUE(contains(output, "hint: run with at most 1 ranks")) << output;
  EXPECT_FALSE(std::filesystem::exists(out));
}

TEST(CommandLine, ConvertAndInspectWork) {
  const std::string out = shared_temp_dir() + "/cli-micro.h5";
  std::string output;
  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic micro --out " + out, &output), 0) << output;
  EXPECT_TRUE(contains(output, "quantized to nf4")) << output;
  ASSERT_EQ(run_command(qlora_binary() + " inspect " + out + " --world 3", &output), 0) << output;
  EXPECT_TRUE(contains(output, "shard plan for 3 ranks")) << output;
  EXPECT_TRUE(contains(output, "model.layers.1.mlp.down_proj.weight")) << output;
  EXPECT_EQ(run_command(qlora_binary() + " convert --synthetic enormous --out " + out + "2", &output), 2) << output;
  EXPECT_TRUE(contains(output, "unknown synthetic preset 'enormous'")) << output;
  EXPECT_FALSE(std::filesystem::exists(out + "2"));
  EXPECT_EQ(run_command(qlora_binary() + " inspect " + shared_temp_dir() + "/absent.h5", &output), 2) << output;
}

TEST(CommandLine, ConvertQuantizationOptionsAndBitsandbytesImport) {
  const std::string folder = shared_temp_dir();
  const char* source = std::getenv("QLORA_SOURCE_DIR");
  const std::string fixtures = std::string(source != nullptr ? source : ".") + "/tests/fixtures/bnb/";
  std::string output;
  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic tiny --double-quant --blocksize 32 --keep-unquantized "
                            "lm_head,down_proj --out " + folder + "/cli-dq.h5", &output),
            0)
      << output;
  EXPECT_TRUE(contains(output, "quantized to nf4 (blocksize 32, double quantization on)")) << output;
  ASSERT_EQ(run_command(qlora_binary() + " inspect " + folder + "/cli-dq.h5 --world 4", &output), 0) << output;
  EXPECT_TRUE(contains(output, "format version   2")) << output;
  EXPECT_TRUE(contains(output, "double quantization on")) << output;
  EXPECT_TRUE(contains(output, "unquantized      lm_head,down_proj")) << output;
  EXPECT_TRUE(contains(output, "shard plan for 4 ranks")) << output;
  // tiny's k_proj has 4 second-level blocks at blocksize 32: 5 ranks cannot share it.
  EXPECT_EQ(run_command(qlora_binary() + " inspect " + folder + "/cli-dq.h5 --world 5", &output), 2) << output;
  EXPECT_TRUE(contains(output, "second-level (256-block) units")) << output;
  EXPECT_TRUE(contains(output, "without --double-quant")) << output;

  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic micro --quant int8 --out " + folder + "/cli-int8.h5",
                        &output),
            0)
      << output;
  EXPECT_TRUE(contains(output, "quantized to int8 (LLM.int8, one fp32 scale per row)")) << output;
  EXPECT_EQ(run_command(qlora_binary() + " convert --synthetic micro --quant int8 --double-quant --out " + folder +
                            "/never.h5", &output),
            2)
      << output;
  EXPECT_TRUE(contains(output, "--double-quant applies to nf4 and fp4 only")) << output;
  EXPECT_FALSE(std::filesystem::exists(folder + "/never.h5"));

  ASSERT_EQ(run_command(qlora_binary() + " convert --from " + fixtures + "nf4_double_quant --out " + folder +
                            "/cli-import.h5", &output),
            0)
      << output;
  EXPECT_TRUE(contains(output, "quantized to nf4 (blocksize 64, double quantization on)")) << output;
  ASSERT_EQ(run_command(qlora_binary() + " convert --from " + fixtures + "int8 --out " + folder + "/cli-import8.h5",
                        &output),
            0)
      << output;
  ASSERT_EQ(run_command(qlora_binary() + " inspect " + folder + "/cli-import8.h5", &output), 0) << output;
  EXPECT_TRUE(contains(output, "bnb-8bit int8")) << output;
}

TEST(CommandLine, TrainsOnTwoRanksAndWritesTheRunFolder) {
  const std::string model = synthetic_store("micro");
  const std::string out = shared_temp_dir() + "/cli-run";
  std::string output;
  ASSERT_EQ(run_command(std::string(kMpirun) + qlora_binary() + " train --model " + model +
                            " --steps 3 --seq-len 32 --global-batch 4 --lora-rank-pattern down_proj=16"
                            " --lora-alpha-pattern model.layers.1.self_attn.q_proj=4 --out " + out,
                        &output),
            0)
      << output;
  EXPECT_TRUE(contains(output, "step    3/3")) << output;
  EXPECT_TRUE(contains(output, "memory per rank")) << output;
  EXPECT_TRUE(std::filesystem::exists(out + "/final/adapter_model.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(out + "/final/adapter_config.json"));
  auto adapter = shard::SafetensorsFile::open(out + "/final/adapter_model.safetensors");
  EXPECT_EQ(adapter->at("base_model.model.model.layers.0.mlp.down_proj.lora_A.weight").shape,
            (std::vector<int64_t>{16, 172}));
  EXPECT_EQ(adapter->at("base_model.model.model.layers.0.mlp.up_proj.lora_A.weight").shape,
            (std::vector<int64_t>{8, 64}));
  // qlora eval: the adapter lowers the loss, and one or two ranks give the same figure.
  std::string base_output;
  std::string one_rank;
  std::string two_ranks;
  const std::string eval = qlora_binary() + " eval --model " + model + " --seq-len 32 --windows 8";
  ASSERT_EQ(run_command(eval, &base_output), 0) << base_output;
  ASSERT_EQ(run_command(eval + " --adapter " + out + "/final", &one_rank), 0) << one_rank;
  ASSERT_EQ(run_command(std::string(kMpirun) + eval + " --adapter " + out + "/final", &two_ranks), 0) << two_ranks;
  auto loss_of = [](const std::string& text) {
    const auto at = text.find("eval: loss ");
    return at == std::string::npos ? -1.0 : std::stod(text.substr(at + 11));
  };
  EXPECT_GT(loss_of(one_rank), 0) << one_rank;
  EXPECT_NEAR(loss_of(one_rank), loss_of(two_ranks), 1e-5) << one_rank << two_ranks;
  EXPECT_LT(loss_of(one_rank), loss_of(base_output)) << base_output << one_rank;
  EXPECT_EQ(run_command(eval + " --adapter " + folder_of_nothing(), &output), 2) << output;
  EXPECT_TRUE(contains(output, "adapter_config.json")) << output;
  EXPECT_EQ(run_command(qlora_binary() + " train --model " + model + " --lora-rank-pattern down_proj", &output), 2)
      << output;
  EXPECT_TRUE(contains(output, "is not MODULE=VALUE")) << output;
  EXPECT_TRUE(std::filesystem::exists(out + "/memory.json"));
}

}  // namespace
}  // namespace qlora

namespace qlora {
namespace {

// What SLURM's --signal does before a time limit: SIGUSR1 reaches the ranks (mpirun forwards it),
// they agree at the next step boundary, rank 0 checkpoints, and every rank exits with 75; the
// requeued command with --resume auto continues from that step.
TEST(CommandLine, SignalCheckpointsAndExitsSeventyFiveThenResumeContinues) {
  const std::string folder = shared_temp_dir();
  const std::string model = synthetic_store("micro");
  const std::string out = folder + "/signal-run";
  const std::string log = folder + "/signal.log";
  const std::string train = qlora_binary() + " train --model " + model +
                            " --seq-len 32 --global-batch 4 --eval-fraction 0 --out " + out;
  const std::string script =
      "bash -c '(" + std::string(kMpirun) + train + " --steps 100000 > " + log + " 2>&1; echo exit=$? >> " + log +
      ") & for i in $(seq 1 600); do grep -q \"step    3/\" " + log +
      " 2>/dev/null && break; sleep 0.1; done; pkill -USR1 -f \"^mpirun.*signal-run\"; wait'";
  std::string output;
  run_command(script, &output);
  std::string text;
  ASSERT_EQ(run_command("cat " + log, &text), 0);
  EXPECT_TRUE(contains(text, "exit=75")) << text;
  EXPECT_TRUE(contains(text, "checkpoint saved at step")) << text;
  const auto at = text.find("checkpoint saved at step ");
  ASSERT_NE(at, std::string::npos) << text;
  const int saved = std::stoi(text.substr(at + 25));
  EXPECT_GE(saved, 3);
  EXPECT_TRUE(std::filesystem::exists(out + "/checkpoints/step-" + std::to_string(saved) + "/trainer_state.h5"));
  EXPECT_FALSE(std::filesystem::exists(out + "/final")) << "a stopped run has no final adapter";

  ASSERT_EQ(run_command(std::string(kMpirun) + train + " --resume auto --steps " + std::to_string(saved + 2), &output),
            0)
      << output;
  EXPECT_TRUE(contains(output, "resumed from " + out + "/checkpoints/step-" + std::to_string(saved) + " at step " +
                                   std::to_string(saved)))
      << output;
  EXPECT_TRUE(contains(output, "step " + std::string(saved + 2 < 10 ? "   " : "  ") + std::to_string(saved + 2) + "/"))
      << output;
  EXPECT_TRUE(std::filesystem::exists(out + "/final/adapter_model.safetensors"));
}

}  // namespace
}  // namespace qlora
