// What verifying a store's tensor checksums costs at load: one rank reading every tensor whole (as a
// one-rank job loads its shard), from a store with checksums and from a copy whose checksum datasets
// were removed (a store of an older qlora, read unverified), interleaved over rounds, page cache warm,
// best time of each. Prints the figures and writes bench/results/store_verify.json.
//
// Usage: bench_store_verify [--dir FOLDER] [--preset smollm2-135m] [--rounds 15]
#include <hdf5.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "common/json.h"
#include "shard/converter.h"
#include "shard/model_store.h"

#ifndef QLORA_RESULTS_DIR
#define QLORA_RESULTS_DIR "bench/results"
#endif

namespace {

using namespace qlora;

// Seconds to read every tensor of `path` whole.
double read_everything(const std::string& path) {
  const auto start = std::chrono::steady_clock::now();
  const auto store = shard::ModelStore::open(path);
  for (const auto& tensor : store->tensors()) {
    if (!tensor.quantized) {
      std::vector<uint8_t> data(static_cast<size_t>(tensor.numel * kernels::dtype_size(tensor.dtype)));
      store->read_dense(tensor.name, data.data());
      continue;
    }
    shard::ShardRange range;
    range.byte_end = tensor.geometry.code_bytes();
    range.block_end = tensor.geometry.blocks();
    range.nested_end = tensor.geometry.nested_blocks();
    std::vector<uint8_t> codes(static_cast<size_t>(range.byte_end));
    std::vector<float> absmax(static_cast<size_t>(range.block_end));
    std::vector<float> nested(static_cast<size_t>(range.nested_end) + 1);
    store->read_quantized(tensor.name, range, codes.data(), absmax.data(), nested.data());
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

herr_t collect_checksum_datasets(hid_t, const char* name, const H5O_info_t*, void* found) {
  const std::string text(name);
  if (text.size() > 8 && text.compare(text.size() - 8, 8, "_fnv1a64") == 0)
    static_cast<std::vector<std::string>*>(found)->push_back("/" + text);
  return 0;
}

void remove_checksums(const std::string& path) {
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  std::vector<std::string> found;
  H5Ovisit(file, H5_INDEX_NAME, H5_ITER_NATIVE, collect_checksum_datasets, &found);
  for (const auto& link : found) H5Ldelete(file, link.c_str(), H5P_DEFAULT);
  H5Fclose(file);
}

}  // namespace

int main(int argc, char** argv) {
  std::string folder = std::filesystem::temp_directory_path().string() + "/qlora-bench-verify";
  std::string preset = "smollm2-135m";
  int rounds = 15;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--dir") folder = argv[i + 1];
    else if (flag == "--preset") preset = argv[i + 1];
    else if (flag == "--rounds") rounds = std::stoi(argv[i + 1]);
  }
  std::filesystem::create_directories(folder);
  const std::string checked = folder + "/" + preset + ".h5";
  const std::string unchecked = folder + "/" + preset + "-no-checksums.h5";
  if (!std::filesystem::exists(checked)) shard::convert_synthetic(preset, checked, shard::ConvertOptions{});
  std::filesystem::copy_file(checked, unchecked, std::filesystem::copy_options::overwrite_existing);
  remove_checksums(unchecked);
  double best_checked = 1e30;
  double best_unchecked = 1e30;
  for (int round = 0; round < rounds; ++round) {
    best_checked = std::min(best_checked, read_everything(checked));
    best_unchecked = std::min(best_unchecked, read_everything(unchecked));
  }
  const auto store = shard::ModelStore::open(checked);
  const double megabytes = static_cast<double>(store->data_bytes()) / 1048576.0;
  const double overhead = 100.0 * (best_checked - best_unchecked) / best_unchecked;
  std::printf("store %s: %.2f MiB of tensor data in %zu tensors\n", preset.c_str(), megabytes, store->tensors().size());
  std::printf("load, verified:   %.4f s (best of %d)\nload, unverified: %.4f s (best of %d)\nverification cost: %+.1f %% of load time\n",
              best_checked, rounds, best_unchecked, rounds, overhead);
  Json result;
  result["preset"] = preset;
  result["tensor_mib"] = megabytes;
  result["rounds"] = rounds;
  result["load_seconds_verified"] = best_checked;
  result["load_seconds_unverified"] = best_unchecked;
  result["verification_cost_percent"] = overhead;
  std::filesystem::create_directories(QLORA_RESULTS_DIR);
  std::ofstream(std::string(QLORA_RESULTS_DIR) + "/store_verify.json") << dump_json(result, 2) << "\n";
  return 0;
}
