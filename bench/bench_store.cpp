// The model store on this machine: conversion throughput (GB/s of safetensors source) for a
// synthetic Hugging Face checkpoint of realistic size (~1.1 GB bf16: 12 Llama layers, hidden 2048),
// the disk's sequential read bandwidth with the file's pages dropped from the cache, and the time
// each rank takes to load its shard under mpirun -np 1, 2 and 4 against (replicated + (quantized +
// embedding / LM head rows) / N) bytes at that bandwidth. Prints the figures and writes bench/results/store.json.
//
// Usage: bench_store [--dir FOLDER] [--mpirun PATH]    (parent: runs everything)
//        bench_store --load STORE --report FILE          (one mpirun child: timed load on each rank)
// Page cache: the parent and rank 0 of a child call posix_fadvise(POSIX_FADV_DONTNEED) on the store
// after fsync, and also try /proc/sys/vm/drop_caches (works only as root outside a container); the
// JSON records whether the cold read was measurably slower than a warm one.
#include <fcntl.h>
#include <mpi.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "cluster/mpi_communicator.h"
#include "common/json.h"
#include "kernels/dtype.h"
#include "kernels/parallel.h"
#include "model/llama.h"
#include "shard/converter.h"
#include "shard/model_store.h"

#ifndef QLORA_RESULTS_DIR
#define QLORA_RESULTS_DIR "bench/results"
#endif

namespace {

using namespace qlora;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

shard::ModelConfig bench_config() {
  shard::ModelConfig config;
  config.architecture = "llama";
  config.hidden_size = 2048;
  config.intermediate_size = 5632;
  config.num_hidden_layers = 12;
  config.num_attention_heads = 16;
  config.num_key_value_heads = 4;
  config.head_dim = 128;
  config.vocab_size = 16000;
  config.max_position_embeddings = 4096;
  config.rms_norm_eps = 1e-5;
  config.rope_theta = 10000.0;
  config.tie_word_embeddings = true;
  config.torch_dtype = "bfloat16";
  return config;
}

// Streams a bf16 safetensors checkpoint to disk one tensor at a time (the SafetensorsWriter keeps
// everything in memory, which a 1 GB source does not need).
uint64_t write_source(const std::string& folder, const shard::ModelConfig& config) {
  std::filesystem::create_directories(folder);
  std::ofstream(folder + "/config.json") << dump_json(config.to_json(), 2);
  const auto names = config.tensor_names();
  Json header = Json::object();
  uint64_t offset = 0;
  for (const auto& name : names) {
    const auto shape = config.expected_shape(name);
    int64_t numel = 1;
    for (int64_t dim : shape) numel *= dim;
    Json& entry = header[name];
    entry["dtype"] = "BF16";
    entry["shape"] = shape;
    entry["data_offsets"] = Json::array({offset, offset + numel * 2});
    offset += numel * 2;
  }
  std::string text = dump_json(header);
  while ((text.size() + 8) % 8 != 0) text += ' ';
  std::ofstream out(folder + "/model.safetensors", std::ios::binary);
  const uint64_t length = text.size();
  out.write(reinterpret_cast<const char*>(&length), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  std::mt19937 generator(11);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<uint16_t> values;
  for (const auto& name : names) {
    const auto shape = config.expected_shape(name);
    int64_t numel = 1;
    for (int64_t dim : shape) numel *= dim;
    values.resize(static_cast<size_t>(numel));
    const bool norm = shape.size() == 1;
    for (auto& value : values) value = kernels::float_to_bf16(norm ? 1.0f : normal(generator));
    out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(numel * 2));
  }
  return offset;
}

// Flushes the file and asks the kernel to drop its pages; returns how ("fadvise", plus
// "drop_caches" when writing /proc/sys/vm/drop_caches worked).
std::string drop_from_page_cache(const std::string& path) {
  std::string method;
  const int fd = open(path.c_str(), O_RDONLY);
  if (fd >= 0) {
    fdatasync(fd);
    if (posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) == 0) method = "fadvise";
    close(fd);
  }
  sync();
  std::ofstream drop("/proc/sys/vm/drop_caches");
  if (drop && (drop << "3" << std::flush)) method += method.empty() ? "drop_caches" : "+drop_caches";
  return method.empty() ? "none" : method;
}

double sequential_read_seconds(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY);
  std::vector<char> buffer(16 << 20);
  const auto start = Clock::now();
  while (read(fd, buffer.data(), buffer.size()) > 0) {
  }
  const double seconds = seconds_since(start);
  close(fd);
  return seconds;
}

uint64_t file_size(const std::string& path) { return std::filesystem::file_size(path); }

// ---- child: one timed load per rank ------------------------------------------------------------

int run_load(const std::string& store_path, const std::string& report_path) {
  MPI_Init(nullptr, nullptr);
  auto communicator = cluster::make_mpi_communicator(MPI_COMM_WORLD);
  const int rank = communicator->rank();
  const int world = communicator->size();
  if (rank == 0) drop_from_page_cache(store_path);
  MPI_Barrier(MPI_COMM_WORLD);
  // Cold (pages dropped), then warm (pages cached by the first load): the difference is the I/O.
  double seconds[2] = {0, 0};
  double bytes = 0;
  for (int pass = 0; pass < 2; ++pass) {
    MPI_Barrier(MPI_COMM_WORLD);
    const auto start = Clock::now();
    auto store = shard::ModelStore::open(store_path);
    model::LlamaModel model(*store, *communicator);
    seconds[pass] = seconds_since(start);
    bytes = static_cast<double>(store->bytes_read());
  }
  std::vector<double> all_cold(world), all_warm(world), all_bytes(world);
  MPI_Gather(&seconds[0], 1, MPI_DOUBLE, all_cold.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  MPI_Gather(&seconds[1], 1, MPI_DOUBLE, all_warm.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  MPI_Gather(&bytes, 1, MPI_DOUBLE, all_bytes.data(), 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    Json report;
    report["seconds_per_rank"] = all_cold;
    report["warm_seconds_per_rank"] = all_warm;
    report["bytes_read_per_rank"] = all_bytes;
    std::ofstream(report_path) << dump_json(report, 2);
  }
  MPI_Finalize();
  return 0;
}

// ---- parent ---------------------------------------------------------------------------------------

// mpirun from a process that never called MPI_Init: only the allow-root switches are needed.
int run_child(const std::string& command) {
  return std::system(("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 " + command).c_str());
}

int run_all(const std::string& folder, const std::string& mpirun, const std::string& self) {
  const shard::ModelConfig config = bench_config();
  const std::string source = folder + "/hf";
  std::printf("writing a synthetic bf16 checkpoint (%lld parameters) to %s ...\n",
              static_cast<long long>(config.parameter_count()), source.c_str());
  const auto write_start = Clock::now();
  const uint64_t source_bytes = write_source(source, config);
  const double write_seconds = seconds_since(write_start);
  std::printf("  %.3f GB written in %.2f s\n", source_bytes / 1e9, write_seconds);

  Json results;
  results["model"] = config.to_json();
  results["source_bytes"] = static_cast<int64_t>(source_bytes);
  results["kernel_threads"] = static_cast<int64_t>(kernels::kernel_threads());
  Json conversions = Json::array();
  struct Variant {
    const char* label;
    shard::ConvertOptions options;
  };
  shard::ConvertOptions nf4;
  shard::ConvertOptions double_quant;
  double_quant.double_quant = true;
  shard::ConvertOptions int8;
  int8.int8 = true;
  const std::string store_path = folder + "/model-nf4.h5";
  for (const Variant& variant : {Variant{"nf4", nf4}, Variant{"nf4+double-quant", double_quant}, Variant{"int8", int8}}) {
    const std::string out = variant.options.int8 ? folder + "/model-int8.h5"
                            : variant.options.double_quant ? folder + "/model-nf4-dq.h5"
                                                           : store_path;
    drop_from_page_cache(source + "/model.safetensors");
    const auto summary = shard::convert_hf_directory(source, out, variant.options);
    const double gbps = static_cast<double>(summary.source_bytes) / summary.seconds / 1e9;
    std::printf("convert %-17s %.3f GB source -> %.3f GB store in %.2f s: %.3f GB/s of source\n", variant.label,
                summary.source_bytes / 1e9, file_size(out) / 1e9, summary.seconds, gbps);
    Json entry;
    entry["variant"] = variant.label;
    entry["seconds"] = summary.seconds;
    entry["source_gb_per_s"] = gbps;
    entry["store_file_bytes"] = static_cast<int64_t>(file_size(out));
    entry["bits_per_parameter"] = 8.0 * static_cast<double>(summary.store_bytes) / static_cast<double>(summary.parameters);
    conversions.push_back(entry);
  }
  results["conversion"] = conversions;

  // Disk bandwidth on the store file itself, cold then warm.
  const uint64_t store_bytes = file_size(store_path);
  const std::string drop_method = drop_from_page_cache(store_path);
  const double cold_seconds = sequential_read_seconds(store_path);
  const double warm_seconds = sequential_read_seconds(store_path);
  const double cold_gbps = store_bytes / cold_seconds / 1e9;
  const double warm_gbps = store_bytes / warm_seconds / 1e9;
  std::printf("read %s (%.3f GB): cold %.3f GB/s (cache dropped by %s), warm %.3f GB/s\n", store_path.c_str(),
              store_bytes / 1e9, cold_gbps, drop_method.c_str(), warm_gbps);
  results["store_file_bytes"] = static_cast<int64_t>(store_bytes);
  results["page_cache_drop"] = drop_method;
  results["disk_read_cold_gb_per_s"] = cold_gbps;
  results["disk_read_warm_gb_per_s"] = warm_gbps;
  results["cold_read_measurably_slower"] = cold_seconds > 1.5 * warm_seconds;

  auto store = shard::ModelStore::open(store_path);
  // Replicated: read whole by every rank; sharded: the quantized tensors and the embedding / LM head
  // rows, of which a rank reads about 1/N.
  uint64_t replicated = 0, quantized = 0, vocabulary = 0;
  for (const auto& tensor : store->tensors()) {
    const bool vocabulary_rows = tensor.name == "model.embed_tokens.weight" || tensor.name == "lm_head.weight";
    (tensor.quantized ? quantized : vocabulary_rows ? vocabulary : replicated) +=
        tensor.quantized ? tensor.geometry.stored_bytes() : tensor.numel * kernels::dtype_size(tensor.dtype);
  }
  results["replicated_bytes"] = static_cast<int64_t>(replicated);
  results["vocabulary_bytes"] = static_cast<int64_t>(vocabulary);
  results["quantized_bytes"] = static_cast<int64_t>(quantized);
  Json loads = Json::array();
  for (int world : {1, 2, 4}) {
    const std::string report = folder + "/load-np" + std::to_string(world) + ".json";
    const std::string command = mpirun + " -np " + std::to_string(world) + " --oversubscribe --bind-to none " + self +
                                " --load " + store_path + " --report " + report;
    if (run_child(command) != 0) {
      std::fprintf(stderr, "bench_store: `%s` failed\n", command.c_str());
      return 1;
    }
    std::ifstream in(report);
    std::stringstream text;
    text << in.rdbuf();
    Json measured = parse_json(text.str(), report);
    double slowest = 0, slowest_warm = 0, most_bytes = 0;
    for (const Json& value : measured.at("seconds_per_rank")) slowest = std::max(slowest, value.get<double>());
    for (const Json& value : measured.at("warm_seconds_per_rank"))
      slowest_warm = std::max(slowest_warm, value.get<double>());
    for (const Json& value : measured.at("bytes_read_per_rank")) most_bytes = std::max(most_bytes, value.get<double>());
    const double sharded = static_cast<double>(quantized + vocabulary) / world;
    const double expected_bytes = static_cast<double>(replicated) + sharded;
    const double at_cold_bandwidth = expected_bytes / (cold_gbps * 1e9);
    std::printf("load np%d: slowest rank %.3f s cold, %.3f s warm; reads %.1f MB (replicated %.1f MB + "
                "(quantized + vocabulary rows)/N %.1f MB; file/N %.1f MB), %.3f s at the cold read bandwidth\n",
                world, slowest, slowest_warm, most_bytes / 1e6, replicated / 1e6, sharded / 1e6,
                store_bytes / 1e6 / world, at_cold_bandwidth);
    measured["world"] = static_cast<int64_t>(world);
    measured["slowest_rank_seconds"] = slowest;
    measured["slowest_rank_warm_seconds"] = slowest_warm;
    measured["expected_bytes_per_rank"] = expected_bytes;
    measured["file_bytes_over_world"] = static_cast<double>(store_bytes) / world;
    measured["seconds_at_cold_bandwidth"] = at_cold_bandwidth;
    loads.push_back(measured);
  }
  results["load"] = loads;
  const std::string out = std::string(QLORA_RESULTS_DIR) + "/store.json";
  std::ofstream(out) << dump_json(results, 2) << "\n";
  std::printf("wrote %s\n", out.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string folder = "/tmp/qlora-bench-store", mpirun = "mpirun", load, report;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--dir") folder = argv[i + 1];
    else if (flag == "--mpirun") mpirun = argv[i + 1];
    else if (flag == "--load") load = argv[i + 1];
    else if (flag == "--report") report = argv[i + 1];
  }
  if (!load.empty()) return run_load(load, report);
  std::filesystem::create_directories(folder);
  const int status = run_all(folder, mpirun, std::filesystem::canonical("/proc/self/exe").string());
  std::filesystem::remove_all(folder);
  return status;
}
