// Faults a user meets on a real machine, driven through the `qlora` binary: a file system that
// refuses a checkpoint's bytes (a file-size limit, RLIMIT_FSIZE, needs no privileges and fails the
// write with EFBIG exactly where a full disk fails it with ENOSPC), a corrupted newest checkpoint, a
// run folder that holds another run, a resume into a different run, and numbers no run can use.
// Each must end with one message naming the thing, exit 2 (or 75 for a stop request), no crash and
// nothing half-written counted as complete.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <filesystem>
#include <fstream>

#include <hdf5.h>

#include "kernels/dtype.h"
#include "shard/model_config.h"
#include "shard/safetensors.h"
#include "support/test_support.h"

namespace qlora {
namespace {

namespace fs = std::filesystem;
using testing_support::qlora_binary;
using testing_support::read_file;
using testing_support::run_command;
using testing_support::shared_temp_dir;
using testing_support::synthetic_store;
using testing_support::write_file;

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

std::string train_command(const std::string& out, const std::string& extra, const std::string& model = "") {
  return qlora_binary() + " train --model " + (model.empty() ? synthetic_store("micro") : model) +
         " --seq-len 32 --global-batch 4 --eval-fraction 0 --progress lines --out " + out + " " + extra;
}

// The file-size limit applies to every file the processes write; OpenMPI's own shared-memory files
// are kept out of its way (PMIx hash store, TCP between ranks) so that only qlora's writes meet it.
// 100 KiB: above metrics.jsonl and micro's adapter (77 KB), below its trainer state (175 KB).
std::string under_file_size_limit(const std::string& command) {
  return "PMIX_MCA_gds=hash OMPI_MCA_btl=self,tcp bash -c 'ulimit -f 100; exec " + command + "'";
}

int64_t step_count_in(const std::string& path) {
  std::ifstream file(path);
  int64_t lines = 0;
  for (std::string line; std::getline(file, line);) lines += !line.empty();
  return lines;
}

TEST(Reliability, ACheckpointThatCannotBeWrittenEndsTheJobWithExitTwoAndLeavesNoPartial) {
  const std::string out = shared_temp_dir() + "/full-disk";
  std::string output;
  ASSERT_EQ(run_command(train_command(out, "--steps 4 --save-every 2"), &output), 0) << output;
  ASSERT_TRUE(fs::exists(out + "/checkpoints/step-4/checkpoint.json"));
  const std::string final_adapter = read_file(out + "/final/adapter_model.safetensors");

  ASSERT_EQ(run_command(under_file_size_limit(train_command(out, "--steps 8 --save-every 2 --resume auto")), &output), 2)
      << output;
  EXPECT_TRUE(contains(output, "error: cannot save checkpoint " + out + "/checkpoints/step-6")) << output;
  EXPECT_TRUE(contains(output, "File too large")) << output;
  EXPECT_TRUE(contains(output, "the checkpoints saved before are intact")) << output;
  EXPECT_FALSE(contains(output, "internal error")) << output;
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-6.partial"));
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-6"));
  EXPECT_EQ(read_file(out + "/final/adapter_model.safetensors"), final_adapter) << "the failed run wrote no final adapter";

  // The intact checkpoint is where the next attempt continues.
  ASSERT_EQ(run_command(train_command(out, "--steps 6 --resume auto"), &output), 0) << output;
  EXPECT_TRUE(contains(output, "resumed from " + out + "/checkpoints/step-4 at step 4")) << output;
  EXPECT_TRUE(fs::exists(out + "/final/adapter_model.safetensors"));
}

// Rank 0 alone writes checkpoints; when its save fails the other rank is told through the watchdog
// and ends within seconds with rank 0's message, far inside the 600 s collective timeout.
TEST(Reliability, UnderMpirunEveryRankEndsWithinSecondsOfAFailedSave) {
  const std::string out = shared_temp_dir() + "/full-disk-mpi";
  std::string output;
  const auto start = std::chrono::steady_clock::now();
  const int code = run_command(under_file_size_limit("mpirun --oversubscribe --allow-run-as-root -np 2 " +
                                                     train_command(out, "--steps 6 --save-every 2 --collective-timeout 600")),
                               &output);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(code, 2) << output;
  EXPECT_LT(seconds, 60.0) << output;
  EXPECT_TRUE(contains(output, "error: cannot save checkpoint " + out + "/checkpoints/step-2")) << output;
  EXPECT_TRUE(contains(output, "[rank 1] error: rank 0 failed (exit code 2): cannot save checkpoint")) << output;
  EXPECT_FALSE(contains(output, "signal")) << output;
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-2.partial"));
}

TEST(Reliability, ResumeAutoSkipsACorruptNewestCheckpointAndSaysWhy) {
  const std::string out = shared_temp_dir() + "/corrupt-newest";
  std::string output;
  ASSERT_EQ(run_command(train_command(out, "--steps 6 --save-every 2 --keep-checkpoints 0"), &output), 0) << output;
  // step-6 written short (as a full disk did), step-4's trainer state with a flipped byte.
  fs::resize_file(out + "/checkpoints/step-6/trainer_state.h5", 4096);
  {
    std::fstream state(out + "/checkpoints/step-4/trainer_state.h5", std::ios::in | std::ios::out | std::ios::binary);
    state.seekp(20000);
    state.put('\x5a');
  }
  ASSERT_EQ(run_command(train_command(out, "--steps 8 --resume auto"), &output), 0) << output;
  EXPECT_TRUE(contains(output, "--resume auto: skipping " + out + "/checkpoints/step-6: trainer_state.h5 has 4096 bytes, "
                               "the manifest says 175280"))
      << output;
  EXPECT_TRUE(contains(output, "--resume auto: skipping " + out + "/checkpoints/step-4: trainer_state.h5 does not match "
                               "its checksum"))
      << output;
  EXPECT_TRUE(contains(output, "resumed from " + out + "/checkpoints/step-2 at step 2")) << output;
  // An explicitly named corrupt checkpoint is refused, not replaced by another.
  EXPECT_EQ(run_command(train_command(out, "--steps 8 --resume " + out + "/checkpoints/step-4"), &output), 2) << output;
  EXPECT_TRUE(contains(output, "cannot resume from " + out + "/checkpoints/step-4: trainer_state.h5 does not match"))
      << output;
}

TEST(Reliability, AnotherRunInTheOutFolderIsRefusedUnlessOverwritten) {
  const std::string out = shared_temp_dir() + "/reused";
  std::string output;
  ASSERT_EQ(run_command(train_command(out, "--steps 4 --save-every 2"), &output), 0) << output;
  write_file(out + "/notes.txt", "the user's own file\n");
  const std::string metrics_before = read_file(out + "/metrics.jsonl");

  EXPECT_EQ(run_command(train_command(out, "--steps 2"), &output), 2) << output;
  EXPECT_TRUE(contains(output, "error: --out " + out + " already holds another run (metrics.jsonl, checkpoints/, final/"))
      << output;
  EXPECT_TRUE(contains(output, "--overwrite")) << output;
  EXPECT_FALSE(contains(output, "prepare:")) << "refused before the model was loaded\n" << output;
  EXPECT_EQ(read_file(out + "/metrics.jsonl"), metrics_before);
  EXPECT_TRUE(fs::exists(out + "/checkpoints/step-4"));

  EXPECT_EQ(run_command(train_command(out, "--steps 2 --overwrite --resume auto"), &output), 2) << output;
  EXPECT_TRUE(contains(output, "--overwrite and --resume contradict each other")) << output;

  ASSERT_EQ(run_command(train_command(out, "--steps 2 --overwrite"), &output), 0) << output;
  EXPECT_TRUE(contains(output, "--overwrite: removed the previous run's")) << output;
  EXPECT_FALSE(fs::exists(out + "/checkpoints/step-4")) << "the old run's checkpoints are gone";
  EXPECT_TRUE(fs::exists(out + "/checkpoints/step-2"));
  EXPECT_EQ(step_count_in(out + "/metrics.jsonl"), 2);
  EXPECT_EQ(read_file(out + "/notes.txt"), "the user's own file\n") << "files qlora did not write stay";
}

TEST(Reliability, ResumeRefusesACheckpointOfADifferentRunUnlessToldToWarn) {
  const std::string out = shared_temp_dir() + "/identity";
  std::string output;
  ASSERT_EQ(run_command(train_command(out, "--steps 2"), &output), 0) << output;
  EXPECT_EQ(run_command(train_command(out, "--steps 4 --resume auto --seed 7 --lora-alpha 32"), &output), 2) << output;
  EXPECT_TRUE(contains(output, "cannot resume from " + out + "/checkpoints/step-2: it was written by a different run:"))
      << output;
  EXPECT_TRUE(contains(output, "lora alpha: checkpoint 16, this run 32")) << output;
  EXPECT_TRUE(contains(output, "seed: checkpoint 1234, this run 7")) << output;
  EXPECT_TRUE(contains(output, "--resume-mismatch warn")) << output;
  const std::string other_data = shared_temp_dir() + "/identity-data.txt";
  std::string text;
  for (int i = 0; i < 200; ++i) text += "A different corpus, line " + std::to_string(i) + ", for another run.\n";
  write_file(other_data, text);
  EXPECT_EQ(run_command(train_command(out, "--steps 4 --resume auto --data " + other_data), &output), 2) << output;
  EXPECT_TRUE(contains(output, "data: checkpoint (embedded excerpt), this run " + other_data)) << output;
  const std::string other_model = shared_temp_dir() + "/identity-other.h5";
  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic micro --seed 99 --out " + other_model, &output), 0) << output;
  EXPECT_EQ(run_command(train_command(out, "--steps 4 --resume auto", other_model), &output), 2) << output;
  EXPECT_TRUE(contains(output, "model checksum: checkpoint ")) << output;

  ASSERT_EQ(run_command(train_command(out, "--steps 4 --resume auto --seed 7 --resume-mismatch warn"), &output), 0)
      << output;
  EXPECT_TRUE(contains(output, "written by a different run (--resume-mismatch warn):")) << output;
  EXPECT_TRUE(contains(output, "resumed from " + out + "/checkpoints/step-2 at step 2")) << output;
}

TEST(Reliability, MetricsOfRepeatedStepsAreKeptAsideNeverTruncatedSilently) {
  const std::string out = shared_temp_dir() + "/metrics-kept";
  std::string output;
  ASSERT_EQ(run_command(train_command(out, "--steps 6 --save-every 2 --keep-checkpoints 0"), &output), 0) << output;
  fs::remove_all(out + "/checkpoints/step-6");  // a crash between step 5's metrics and step 6's checkpoint
  fs::remove_all(out + "/checkpoints/step-4");
  const std::string before = read_file(out + "/metrics.jsonl");
  ASSERT_EQ(run_command(train_command(out, "--steps 6 --resume auto"), &output), 0) << output;
  EXPECT_TRUE(contains(output, "the previous file is kept as " + out + "/metrics.before-step-2.jsonl")) << output;
  EXPECT_EQ(read_file(out + "/metrics.before-step-2.jsonl"), before);
  EXPECT_EQ(step_count_in(out + "/metrics.jsonl"), 6) << "steps 1-2 kept, 3-6 written once by the resumed run";
}

TEST(Reliability, NumbersNoRunCanUseAreRefusedNamingTheFlag) {
  const std::string out = shared_temp_dir() + "/never-created-numbers";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"--lr nan", "--lr must be a positive number"},
      {"--lr inf", "--lr must be a positive number"},
      {"--lora-alpha nan", "--lora-alpha must be a positive number"},
      {"--lora-alpha inf", "--lora-alpha must be a positive number"},
      {"--lora-alpha -4", "--lora-alpha must be a positive number"},
      {"--lora-dropout nan", "--lora-dropout must be in [0, 1)"},
      {"--weight-decay nan", "--weight-decay must be a non-negative number"},
      {"--max-grad-norm nan", "--max-grad-norm must be 0 (off) or a positive number"},
      {"--resume-mismatch maybe", "--resume-mismatch must be refuse or warn"},
  };
  for (const auto& [flags, message] : cases) {
    std::string output;
    EXPECT_EQ(run_command(train_command(out, "--steps 2 " + flags), &output), 2) << flags << "\n" << output;
    EXPECT_TRUE(contains(output, "error: " + message)) << flags << "\n" << output;
    EXPECT_FALSE(contains(output, "internal error")) << flags << "\n" << output;
  }
  std::string output;
  EXPECT_EQ(run_command(qlora_binary() + " train --model " + synthetic_store("micro") +
                            " --global-batch 9223372036854775807 --out " + out, &output),
            2)
      << output;
  EXPECT_TRUE(contains(output, "error: --global-batch 9223372036854775807 x --seq-len 128 exceeds 2^40 tokens per step"))
      << output;
  EXPECT_FALSE(fs::exists(out));
}

TEST(Reliability, AnUnwritableOutIsRefusedBeforeTheModelIsLoaded) {
  const std::string file = shared_temp_dir() + "/a-file-not-a-folder";
  write_file(file, "x");
  std::string output;
  EXPECT_EQ(run_command(train_command(file + "/run", "--steps 2"), &output), 2) << output;
  EXPECT_TRUE(contains(output, "error: --out " + file + "/run cannot be created: Not a directory")) << output;
  EXPECT_FALSE(contains(output, "prepare:")) << output;
  EXPECT_FALSE(contains(output, "internal error")) << output;
  // A folder that does not exist yet is created to probe it, and removed again if the run ends early.
  const std::string fresh = shared_temp_dir() + "/probe-parent/run";
  EXPECT_EQ(run_command(train_command(fresh, "--steps 2 --data /nonexistent/corpus"), &output), 2) << output;
  EXPECT_FALSE(fs::exists(shared_temp_dir() + "/probe-parent")) << output;
}

TEST(Reliability, SequenceLongerThanTheModelsContextIsNamedInAWarning) {
  const std::string out = shared_temp_dir() + "/long-context";
  std::string output;
  // micro's max_position_embeddings is 1024.
  ASSERT_EQ(run_command(qlora_binary() + " train --model " + synthetic_store("micro") +
                            " --seq-len 1100 --global-batch 1 --steps 1 --eval-fraction 0 --progress lines --out " + out,
                        &output),
            0)
      << output;
  EXPECT_TRUE(contains(output, "warning: --seq-len 1100 exceeds the 1024-token context of")) << output;
  ASSERT_EQ(run_command(train_command(out + "-short", "--steps 1"), &output), 0) << output;
  EXPECT_FALSE(contains(output, "exceeds the")) << output;
}

// A single process (and each rank under srun) that receives SIGTERM checkpoints and exits 75.
TEST(Reliability, SigtermToASingleProcessSavesAndExitsSeventyFive) {
  const std::string out = shared_temp_dir() + "/sigterm-single";
  const std::string log = shared_temp_dir() + "/sigterm-single.log";
  const std::string script = "bash -c '" + train_command(out, "--steps 100000") + " > " + log +
                             " 2>&1 & pid=$!; for i in $(seq 1 600); do grep -q \"step    3/\" " + log +
                             " 2>/dev/null && break; sleep 0.1; done; kill -TERM $pid; wait $pid; echo exit=$? >> " + log +
                             "'";
  std::string output;
  run_command(script, &output);
  const std::string text = read_file(log);
  EXPECT_TRUE(contains(text, "exit=75")) << text;
  const auto at = text.find("checkpoint saved at step ");
  ASSERT_NE(at, std::string::npos) << text;
  EXPECT_TRUE(fs::exists(out + "/checkpoints/step-" + std::to_string(std::stoi(text.substr(at + 25))) + "/checkpoint.json"));
}

// A Hugging Face folder of micro's shape (bf16, small random weights) with one value of `poisoned`
// replaced by `bad`.
std::string poisoned_model_folder(const std::string& folder, const std::string& poisoned, float bad) {
  const auto config = shard::ModelConfig::from_json(
      Json{{"model_type", "llama"}, {"hidden_size", 64}, {"intermediate_size", 172}, {"num_hidden_layers", 2},
           {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 512}},
      "test config");
  write_file(folder + "/config.json", dump_json(config.to_json()));
  shard::SafetensorsWriter writer;
  for (const auto& name : config.tensor_names()) {
    const auto shape = config.expected_shape(name);
    int64_t numel = 1;
    for (const int64_t dim : shape) numel *= dim;
    std::vector<uint16_t> values(static_cast<size_t>(numel));
    for (int64_t i = 0; i < numel; ++i) values[i] = kernels::float_to_bf16(0.01f * static_cast<float>((i * 7919) % 201 - 100));
    if (name == poisoned) values[static_cast<size_t>(numel / 3)] = kernels::float_to_bf16(bad);
    writer.add(name, kernels::DType::bf16, shape, values.data(), values.size() * sizeof(uint16_t));
  }
  writer.write(folder + "/model.safetensors");
  return folder;
}

TEST(Reliability, NonFiniteEmbeddingsNormsOrHeadAreRefusedAtConvertNamingTheTensor) {
  const std::string folder = shared_temp_dir();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<std::pair<std::string, float>> cases = {
      {"model.embed_tokens.weight", nan}, {"model.layers.1.input_layernorm.weight", inf},
      {"model.norm.weight", nan}, {"lm_head.weight", -inf}};
  for (const auto& [tensor, bad] : cases) {
    const std::string source = poisoned_model_folder(folder + "/poisoned-" + tensor, tensor, bad);
    const std::string out = folder + "/poisoned-" + tensor + ".h5";
    std::string output;
    EXPECT_EQ(run_command(qlora_binary() + " convert --from " + source + " --out " + out, &output), 2) << output;
    EXPECT_TRUE(contains(output, "error: tensor '" + tensor + "' of ")) << output;
    EXPECT_TRUE(contains(output, std::string(std::isnan(bad) ? "holds NaN" : "holds Inf") + " in its values")) << output;
    EXPECT_FALSE(fs::exists(out)) << output;
    EXPECT_FALSE(fs::exists(out + ".partial")) << output;
  }
  // The same folder without the poison converts.
  std::string output;
  const std::string healthy = poisoned_model_folder(folder + "/healthy", "none", 0.0f);
  EXPECT_EQ(run_command(qlora_binary() + " convert --from " + healthy + " --out " + folder + "/healthy.h5", &output), 0)
      << output;
}

// bitsandbytes' nf4 fixture with a NaN written over one absmax block of a decoder linear.
TEST(Reliability, ANanQuantizationScaleIsReportedAsACorruptSourceTensor) {
  const std::string folder = shared_temp_dir() + "/nan-absmax";
  fs::create_directories(folder);
  const std::string fixture = testing_support::source_dir() + "/tests/fixtures/bnb/nf4";
  fs::copy_file(fixture + "/config.json", folder + "/config.json", fs::copy_options::overwrite_existing);
  fs::copy_file(fixture + "/model.safetensors", folder + "/model.safetensors", fs::copy_options::overwrite_existing);
  const std::string tensor = "model.layers.0.mlp.up_proj.weight";
  uint64_t data_start = 0;
  uint64_t absmax_begin = 0;
  {
    auto file = shard::SafetensorsFile::open(folder + "/model.safetensors");
    absmax_begin = file->at(tensor + ".absmax").begin;
    std::ifstream raw(folder + "/model.safetensors", std::ios::binary);
    unsigned char length[8];
    raw.read(reinterpret_cast<char*>(length), 8);
    for (int i = 7; i >= 0; --i) data_start = (data_start << 8) | length[i];
    data_start += 8;
  }
  {
    std::fstream raw(folder + "/model.safetensors", std::ios::in | std::ios::out | std::ios::binary);
    raw.seekp(static_cast<std::streamoff>(data_start + absmax_begin + 4));  // the second block's scale
    const float nan = std::numeric_limits<float>::quiet_NaN();
    raw.write(reinterpret_cast<const char*>(&nan), sizeof nan);
  }
  std::string output;
  EXPECT_EQ(run_command(qlora_binary() + " convert --from " + folder + " --out " + folder + ".h5", &output), 2) << output;
  EXPECT_TRUE(contains(output, "error: tensor '" + tensor + "' of ")) << output;
  EXPECT_TRUE(contains(output, "holds NaN in its absmax (quantization scales) (element 1): the source is corrupt")) << output;
  EXPECT_FALSE(contains(output, "check the data")) << output;
  EXPECT_FALSE(fs::exists(folder + ".h5"));
}

TEST(Reliability, AnAdapterWithAnImpossibleRankIsRefusedNamingTheField) {
  const std::string out = shared_temp_dir() + "/adapter-rank";
  std::string output;
  ASSERT_EQ(run_command(train_command(out, "--steps 1"), &output), 0) << output;
  const std::string config_text = read_file(out + "/final/adapter_config.json");
  for (const std::string rank : {"-1", "1000000000"}) {
    const std::string adapter = out + "/bad-rank" + rank;
    fs::create_directories(adapter);
    fs::copy_file(out + "/final/adapter_model.safetensors", adapter + "/adapter_model.safetensors",
                  fs::copy_options::overwrite_existing);
    std::string text = config_text;
    text.replace(text.find("\"r\": 8"), 6, "\"r\": " + rank);
    write_file(adapter + "/adapter_config.json", text);
    EXPECT_EQ(run_command(qlora_binary() + " eval --model " + synthetic_store("micro") + " --seq-len 16 --windows 2 --adapter " +
                              adapter, &output),
              2)
        << output;
    EXPECT_TRUE(contains(output, "adapter_config.json: r is " + rank + ", outside 1..65536")) << output;
    EXPECT_FALSE(contains(output, "internal error")) << output;
  }
}

// Where HDF5 keeps a tensor dataset's bytes in the store file (contiguous layout).
uint64_t dataset_file_offset(const std::string& store, const std::string& dataset) {
  const hid_t file = H5Fopen(store.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  const hid_t data = H5Dopen2(file, dataset.c_str(), H5P_DEFAULT);
  const haddr_t offset = H5Dget_offset(data);
  H5Dclose(data);
  H5Fclose(file);
  return offset;
}

TEST(Reliability, ACorruptedStoredTensorEndsTrainingAndInspectVerifyNamingIt) {
  const std::string folder = shared_temp_dir();
  const std::string store = folder + "/checksummed.h5";
  std::string output;
  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic micro --out " + store, &output), 0) << output;
  ASSERT_EQ(run_command(qlora_binary() + " inspect " + store + " --verify", &output), 0) << output;
  EXPECT_TRUE(contains(output, "match their checksums")) << output;

  // 4 KiB of one projection's codes overwritten, as a bad sector or a stray write would.
  const std::string tensor = "model.layers.1.mlp.down_proj.weight";
  const uint64_t offset = dataset_file_offset(store, "/tensors/" + tensor + "/codes");
  ASSERT_NE(offset, static_cast<uint64_t>(HADDR_UNDEF));
  {
    std::fstream raw(store, std::ios::in | std::ios::out | std::ios::binary);
    raw.seekp(static_cast<std::streamoff>(offset));
    const std::string noise(4096, '\x5a');
    raw.write(noise.data(), static_cast<std::streamsize>(noise.size()));
  }
  const std::string message = "tensor '" + tensor + "': its stored codes (bytes 0 to 5504) do not match their checksum";
  EXPECT_EQ(run_command(qlora_binary() + " inspect " + store + " --verify", &output), 2) << output;
  EXPECT_TRUE(contains(output, message)) << output;
  EXPECT_EQ(run_command(train_command(folder + "/corrupt-store-run", "--steps 1", store), &output), 2) << output;
  EXPECT_TRUE(contains(output, message)) << output;
  EXPECT_EQ(run_command("mpirun --oversubscribe --allow-run-as-root -np 2 " +
                            train_command(folder + "/corrupt-store-run", "--steps 1", store), &output),
            2)
      << output;
  EXPECT_TRUE(contains(output, message)) << output;

  // A store from before checksums (their datasets removed) still trains, with a note.
  const std::string older = folder + "/older.h5";
  ASSERT_EQ(run_command(qlora_binary() + " convert --synthetic micro --out " + older, &output), 0) << output;
  {
    const hid_t file = H5Fopen(older.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    for (const auto& name : shard::ModelConfig::from_json(
                                Json{{"hidden_size", 64}, {"intermediate_size", 172}, {"num_hidden_layers", 2},
                                     {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"vocab_size", 512}},
                                "micro")
                                .tensor_names())
      for (const char* part : {"codes", "absmax", "data"}) {
        const std::string link = "/tensors/" + name + "/" + part + "_fnv1a64";
        if (H5Lexists(file, link.c_str(), H5P_DEFAULT) > 0) H5Ldelete(file, link.c_str(), H5P_DEFAULT);
      }
    H5Fclose(file);
  }
  EXPECT_EQ(run_command(train_command(folder + "/older-store-run", "--steps 1", older), &output), 0) << output;
  EXPECT_TRUE(contains(output, "note: " + older + " has no tensor checksums")) << output;
  EXPECT_EQ(run_command(qlora_binary() + " inspect " + older + " --verify", &output), 2) << output;
  EXPECT_TRUE(contains(output, "nothing to verify")) << output;
}

}  // namespace
}  // namespace qlora
