// Planner accuracy: trains a small GQA model under mpirun at world 1, 2 and 4 and sequence lengths
// 128 and 512 (the configurations test_plan checks against a 10% bound), and records every rank's
// planned against measured peak and activation peaks in bench/results/plan_accuracy.json.
// Usage: bench_plan [--qlora PATH] [--dir FOLDER]   (default: the qlora next to build/bench/)
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "common/json.h"
#include "launcher/plan.h"

namespace fs = std::filesystem;
using qlora::Json;

namespace {

int run(const std::string& command) {
  return std::system(("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " + command).c_str());
}

Json read_json(const std::string& path) {
  std::ifstream file(path);
  std::stringstream text;
  text << file.rdbuf();
  return qlora::parse_json(text.str(), path);
}

}  // namespace

int main(int argc, char** argv) {
  std::string qlora = (fs::canonical("/proc/self/exe").parent_path().parent_path() / "qlora").string();
  std::string folder = "/tmp/qlora-bench-plan";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--qlora") qlora = argv[i + 1];
    if (flag == "--dir") folder = argv[i + 1];
  }
  fs::create_directories(folder);
  const std::string config_path = folder + "/config.json";
  std::ofstream(config_path) << R"({"model_type": "llama", "hidden_size": 256, "intermediate_size": 704,
    "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": false, "torch_dtype": "bfloat16"})";
  const std::string store = folder + "/model.h5";
  if (run(qlora + " convert --synthetic " + config_path + " --out " + store + " > /dev/null") != 0) return 1;
  const auto config = qlora::shard::read_config_file(config_path);

  const int64_t micro_batch = 2;
  Json rows = Json::array();
  double lowest = 1e9, highest = 0;
  for (const int64_t sequence_length : {128, 512}) {
    for (const int world : {1, 2, 4}) {
      const std::string out = folder + "/run-" + std::to_string(world) + "-" + std::to_string(sequence_length);
      std::ostringstream command;
      command << "mpirun -np " << world << " --oversubscribe " << qlora << " train --model " << store
              << " --steps 2 --seq-len " << sequence_length << " --global-batch " << micro_batch * world
              << " --lora-r 8 --eval-fraction 0 --progress lines --out " << out << " > " << out << ".log 2>&1";
      fs::remove_all(out);
      if (run(command.str()) != 0) {
        std::fprintf(stderr, "training failed: see %s.log\n", out.c_str());
        return 1;
      }
      qlora::launcher::PlanJob job;
      job.world = world;
      job.micro_batch = micro_batch;
      job.sequence_length = sequence_length;
      job.lora.r = 8;
      const auto plan = qlora::launcher::make_plan(store, config, job);
      const std::string memory_path = out + "/memory.json";
      const Json measured = read_json(memory_path).at("ranks");
      for (int rank = 0; rank < world; ++rank) {
        const Json& actual = measured.at(static_cast<size_t>(rank));
        const auto& planned = plan.ranks[static_cast<size_t>(rank)];
        auto measured_bytes = [&](const char* field) {
          return static_cast<double>(qlora::json_int(actual, field, memory_path));
        };
        const double peak = measured_bytes("peak_total_bytes");
        const double forward = measured_bytes("forward_activation_peak_bytes");
        const double backward = measured_bytes("backward_activation_peak_bytes");
        const double ratio = static_cast<double>(planned.peak) / peak;
        lowest = std::min(lowest, ratio);
        highest = std::max(highest, ratio);
        Json row;
        row["world"] = world;
        row["sequence_length"] = sequence_length;
        row["rank"] = rank;
        row["measured_peak_bytes"] = static_cast<int64_t>(peak);
        row["planned_peak_bytes"] = planned.peak;
        row["peak_ratio"] = ratio;
        row["forward_activation_ratio"] = static_cast<double>(planned.forward_activations) / forward;
        row["backward_activation_ratio"] = static_cast<double>(planned.backward_activations) / backward;
        rows.push_back(row);
        std::printf("world %d seq %4lld rank %d: peak planned %.2f MiB / measured %.2f MiB = %.3f"
                    " (forward activations %.3f, backward %.3f)\n",
                    world, static_cast<long long>(sequence_length), rank, static_cast<double>(planned.peak) / 1048576.0,
                    peak / 1048576.0, ratio, static_cast<double>(planned.forward_activations) / forward,
                    static_cast<double>(planned.backward_activations) / backward);
      }
    }
  }
  std::printf("planned / measured peak: %.3f - %.3f over %zu ranks\n", lowest, highest, rows.size());
  Json result;
  result["benchmark"] = "plan_accuracy";
  result["model"] = "6 layers, hidden 256, intermediate 704, heads 8/4, vocab 4096, untied, NF4";
  result["job"] = "micro-batch 2 per rank, LoRA r=8 on all projections, reentrant checkpointing, 2 steps";
  result["rows"] = rows;
  result["lowest_peak_ratio"] = lowest;
  result["highest_peak_ratio"] = highest;
  const std::string path = std::string(QLORA_RESULTS_DIR) + "/plan_accuracy.json";
  std::ofstream(path) << qlora::dump_json(result, 2) << "\n";
  std::printf("wrote %s\n", path.c_str());
  return 0;
}
