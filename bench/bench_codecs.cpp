// Throughput of the kernels/ codecs on this machine: NF4 dequantization to fp32 and bf16 (fast path
// and reference) for 4 MiB to 1 GiB tensors, as GB/s of bytes read + written and as a fraction of
// memcpy's bandwidth measured in the same run with the same threads; and quantization throughput.
// Prints a table and writes bench/results/codecs.json.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/json.h"
#include "kernels/nf4.h"
#include "kernels/parallel.h"

#if defined(QLORA_HAVE_CUDA) && QLORA_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "kernels/cuda/nf4_cuda.h"
#endif

#ifndef QLORA_RESULTS_DIR
#define QLORA_RESULTS_DIR "bench/results"
#endif

namespace {

using namespace qlora::kernels;
using Clock = std::chrono::steady_clock;

constexpr int64_t kBlocksize = 64;
constexpr int64_t kMiB = 1 << 20;

// Best time of `repetitions` runs after one warm-up (the warm-up also faults the pages in).
double best_seconds(int repetitions, const std::function<void()>& run) {
  run();
  double best = 1e30;
  for (int i = 0; i < repetitions; ++i) {
    const auto start = Clock::now();
    run();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - start).count());
  }
  return best;
}

// Fewer repetitions for big tensors keep the whole run well under two minutes.
int repetitions_for(int64_t bytes) { return bytes >= 512 * kMiB ? 3 : (bytes >= 64 * kMiB ? 5 : 20); }

std::string cpu_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

struct Row {
  std::string operation;  // memcpy, dequantize, quantize
  std::string detail;     // output dtype or input dtype
  std::string path;       // fast, reference, scalar
  int64_t tensor_bytes;   // size of the dense (fp32) tensor
  int threads;
  double gb_per_s;        // (bytes read + bytes written) / time
  double ratio_to_memcpy; // 0 when not applicable
};

#if defined(QLORA_HAVE_CUDA) && QLORA_HAVE_CUDA
// GPU dequantization of a 1 GiB (fp32) tensor against a device-to-device copy of the output size.
void bench_cuda(const std::function<void(const Row&)>& print) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("(no CUDA device: GPU rows skipped)\n");
    return;
  }
  const int64_t tensor_bytes = 1024 * kMiB;
  const int64_t n = tensor_bytes / 4;
  void* packed = nullptr;
  void* absmax = nullptr;
  void* output = nullptr;
  void* copy_source = nullptr;
  cudaMalloc(&packed, static_cast<size_t>(packed_byte_count(n)));
  cudaMalloc(&absmax, static_cast<size_t>(quant_block_count(n, kBlocksize)) * 4);
  cudaMalloc(&output, static_cast<size_t>(tensor_bytes));
  cudaMalloc(&copy_source, static_cast<size_t>(tensor_bytes));
  cudaMemset(packed, 0x5a, static_cast<size_t>(packed_byte_count(n)));
  cudaMemset(absmax, 0, static_cast<size_t>(quant_block_count(n, kBlocksize)) * 4);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  auto time_gpu = [&](const std::function<void()>& run) {
    run();
    float best = 1e30f;
    for (int i = 0; i < 10; ++i) {
      cudaEventRecord(start);
      run();
      cudaEventRecord(stop);
      cudaEventSynchronize(stop);
      float milliseconds = 0;
      cudaEventElapsedTime(&milliseconds, start, stop);
      best = std::min(best, milliseconds);
    }
    return best / 1e3;
  };
  const double compressed = static_cast<double>(packed_byte_count(n) + quant_block_count(n, kBlocksize) * 4);
  const double copy32 = 2.0 * tensor_bytes / time_gpu([&] {
    cudaMemcpyAsync(output, copy_source, static_cast<size_t>(tensor_bytes), cudaMemcpyDeviceToDevice);
  }) / 1e9;
  const double copy16 = 2.0 * (tensor_bytes / 2) / time_gpu([&] {
    cudaMemcpyAsync(output, copy_source, static_cast<size_t>(tensor_bytes / 2), cudaMemcpyDeviceToDevice);
  }) / 1e9;
  print({"memcpy_gpu", "f32", "cuda", tensor_bytes, 0, copy32, 0});
  const double fast32 = (compressed + tensor_bytes) / time_gpu([&] {
    cuda::dequantize_4bit(QuantType::nf4, static_cast<uint8_t*>(packed), static_cast<float*>(absmax), n, kBlocksize,
                          static_cast<float*>(output), nullptr);
  }) / 1e9;
  print({"dequant_gpu", "f32", "cuda", tensor_bytes, 0, fast32, fast32 / copy32});
  const double fast16 = (compressed + tensor_bytes / 2) / time_gpu([&] {
    cuda::dequantize_4bit_bf16(QuantType::nf4, static_cast<uint8_t*>(packed), static_cast<float*>(absmax), n,
                               kBlocksize, static_cast<uint16_t*>(output), nullptr);
  }) / 1e9;
  print({"dequant_gpu", "bf16", "cuda", tensor_bytes, 0, fast16, fast16 / copy16});
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaFree(packed);
  cudaFree(absmax);
  cudaFree(output);
  cudaFree(copy_source);
}
#endif

}  // namespace

int main() {
  const int all_threads = kernel_threads();
  const std::vector<int64_t> tensor_sizes = {4 * kMiB, 16 * kMiB, 64 * kMiB, 256 * kMiB, 1024 * kMiB};
  std::vector<Row> rows;
  std::mt19937 generator(1234);
  std::normal_distribution<float> normal(0.0f, 0.02f);

  std::printf("qlora codec benchmark: %s, %d threads, SIMD %s, NF4 blocksize %lld\n", cpu_name().c_str(),
              all_threads, best_simd_level() == SimdLevel::avx2 ? "avx2" : "scalar",
              static_cast<long long>(kBlocksize));
  std::printf("%-11s %-5s %-9s %10s %7s %10s %9s\n", "operation", "dtype", "path", "tensor", "threads", "GB/s",
              "x memcpy");
  auto print = [&](const Row& row) {
    rows.push_back(row);
    char ratio[32] = "";
    if (row.ratio_to_memcpy > 0) std::snprintf(ratio, sizeof ratio, "%.2f", row.ratio_to_memcpy);
    std::printf("%-11s %-5s %-9s %7lld MiB %7d %10.2f %9s\n", row.operation.c_str(), row.detail.c_str(),
                row.path.c_str(), static_cast<long long>(row.tensor_bytes / kMiB), row.threads, row.gb_per_s, ratio);
    std::fflush(stdout);
  };

  for (int64_t tensor_bytes : tensor_sizes) {
    const int64_t n = tensor_bytes / 4;
    std::vector<float> dense(static_cast<size_t>(n));
    for (int64_t i = 0; i < std::min<int64_t>(n, 1 << 20); ++i) dense[static_cast<size_t>(i)] = normal(generator);
    for (int64_t i = 1 << 20; i < n; ++i) dense[static_cast<size_t>(i)] = dense[static_cast<size_t>(i % (1 << 20))];
    std::vector<uint8_t> packed(static_cast<size_t>(packed_byte_count(n)));
    std::vector<float> absmax(static_cast<size_t>(quant_block_count(n, kBlocksize)));
    quantize_4bit(QuantType::nf4, dense.data(), n, kBlocksize, packed.data(), absmax.data());
    const double compressed_bytes = static_cast<double>(packed.size() + absmax.size() * 4);
    std::vector<uint16_t> dense16(static_cast<size_t>(n));
    const int repetitions = repetitions_for(tensor_bytes);

    std::vector<int> thread_counts = {1};
    if (all_threads > 1) thread_counts.push_back(all_threads);
    for (int threads : thread_counts) {
      set_kernel_threads(threads);
      // memcpy of the fp32 and the bf16 output sizes, split over the same threads as the codec.
      auto parallel_copy = [&](void* destination, const void* source, int64_t bytes) {
        parallel_for(bytes, 1 << 20, [&](int64_t begin, int64_t end) {
          std::memcpy(static_cast<char*>(destination) + begin, static_cast<const char*>(source) + begin,
                      static_cast<size_t>(end - begin));
        });
      };
      std::vector<float> copy_source(dense);
      const double memcpy32 = 2.0 * tensor_bytes / best_seconds(repetitions, [&] {
        parallel_copy(dense.data(), copy_source.data(), tensor_bytes);
      }) / 1e9;
      copy_source.clear();
      copy_source.shrink_to_fit();
      std::vector<uint16_t> copy_source16(dense16);
      const double memcpy16 = 2.0 * (tensor_bytes / 2) / best_seconds(repetitions, [&] {
        parallel_copy(dense16.data(), copy_source16.data(), tensor_bytes / 2);
      }) / 1e9;
      copy_source16.clear();
      copy_source16.shrink_to_fit();
      print({"memcpy", "f32", "memcpy", tensor_bytes, threads, memcpy32, 0});
      print({"memcpy", "bf16", "memcpy", tensor_bytes, threads, memcpy16, 0});

      const double fp32_traffic = compressed_bytes + static_cast<double>(tensor_bytes);
      const double bf16_traffic = compressed_bytes + static_cast<double>(tensor_bytes / 2);
      const double fast32 = fp32_traffic / best_seconds(repetitions, [&] {
        dequantize_4bit(QuantType::nf4, packed.data(), absmax.data(), n, kBlocksize, dense.data());
      }) / 1e9;
      print({"dequantize", "f32", "fast", tensor_bytes, threads, fast32, fast32 / memcpy32});
      const double fast16 = bf16_traffic / best_seconds(repetitions, [&] {
        dequantize_4bit_bf16(QuantType::nf4, packed.data(), absmax.data(), n, kBlocksize, dense16.data());
      }) / 1e9;
      print({"dequantize", "bf16", "fast", tensor_bytes, threads, fast16, fast16 / memcpy16});
      if (best_simd_level() == SimdLevel::avx2) {
        set_simd_level(SimdLevel::scalar);
        const double scalar32 = fp32_traffic / best_seconds(repetitions, [&] {
          dequantize_4bit(QuantType::nf4, packed.data(), absmax.data(), n, kBlocksize, dense.data());
        }) / 1e9;
        print({"dequantize", "f32", "scalar", tensor_bytes, threads, scalar32, scalar32 / memcpy32});
        set_simd_level(best_simd_level());
      }
      // The plain reference is single-threaded and slow: measured up to 64 MiB.
      if (threads == 1 && tensor_bytes <= 64 * kMiB) {
        const double reference32 = fp32_traffic / best_seconds(std::max(1, repetitions / 4), [&] {
          dequantize_4bit_reference(QuantType::nf4, packed.data(), absmax.data(), n, kBlocksize, dense.data());
        }) / 1e9;
        print({"dequantize", "f32", "reference", tensor_bytes, 1, reference32, reference32 / memcpy32});
        const double reference16 = bf16_traffic / best_seconds(std::max(1, repetitions / 4), [&] {
          dequantize_4bit_bf16_reference(QuantType::nf4, packed.data(), absmax.data(), n, kBlocksize, dense16.data());
        }) / 1e9;
        print({"dequantize", "bf16", "reference", tensor_bytes, 1, reference16, reference16 / memcpy16});
      }

      // Quantization (the converter's job): fp32 and bf16 inputs, 4 to 64 MiB tensors.
      if (tensor_bytes <= 64 * kMiB) {
        for (int64_t i = 0; i < n; ++i) dense16[static_cast<size_t>(i)] = float_to_bf16(dense[static_cast<size_t>(i)]);
        const double quantize32 = fp32_traffic / best_seconds(std::max(1, repetitions / 4), [&] {
          quantize_4bit(QuantType::nf4, dense.data(), n, kBlocksize, packed.data(), absmax.data());
        }) / 1e9;
        print({"quantize", "f32", "fast", tensor_bytes, threads, quantize32, 0});
        const double quantize16 = bf16_traffic / best_seconds(std::max(1, repetitions / 4), [&] {
          quantize_4bit(QuantType::nf4, DType::bf16, dense16.data(), n, kBlocksize, packed.data(), absmax.data());
        }) / 1e9;
        print({"quantize", "bf16", "fast", tensor_bytes, threads, quantize16, 0});
        if (threads == 1) {
          const double reference = fp32_traffic / best_seconds(1, [&] {
            quantize_4bit_reference(QuantType::nf4, dense.data(), n, kBlocksize, packed.data(), absmax.data());
          }) / 1e9;
          print({"quantize", "f32", "reference", tensor_bytes, 1, reference, 0});
        }
      }
    }
    set_kernel_threads(0);
  }

#if defined(QLORA_HAVE_CUDA) && QLORA_HAVE_CUDA
  bench_cuda(print);
#endif

  std::ostringstream json;
  // Written by hand to keep one row per line; the CPU name is the one string from outside.
  json << "{\n  \"machine\": {\"cpu\": " << qlora::dump_json(qlora::Json(cpu_name())) << ", \"threads\": " << all_threads
       << ", \"simd\": \"" << (best_simd_level() == SimdLevel::avx2 ? "avx2" : "scalar") << "\"},\n"
       << "  \"quant_type\": \"nf4\", \"blocksize\": " << kBlocksize << ",\n"
       << "  \"note\": \"gb_per_s counts bytes read + written (codes + absmax + output); ratio_to_memcpy compares "
          "with memcpy of the output size on the same threads in this run\",\n  \"rows\": [\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const Row& row = rows[i];
    char line[512];
    std::snprintf(line, sizeof line,
                  "    {\"operation\": \"%s\", \"dtype\": \"%s\", \"path\": \"%s\", \"tensor_bytes\": %lld, "
                  "\"threads\": %d, \"gb_per_s\": %.3f, \"ratio_to_memcpy\": %.3f}%s\n",
                  row.operation.c_str(), row.detail.c_str(), row.path.c_str(), static_cast<long long>(row.tensor_bytes),
                  row.threads, row.gb_per_s, row.ratio_to_memcpy, i + 1 < rows.size() ? "," : "");
    json << line;
  }
  json << "  ]\n}\n";
  const std::string path = std::string(QLORA_RESULTS_DIR) + "/codecs.json";
  std::ofstream out(path);
  out << json.str();
  if (!out) {
    std::fprintf(stderr, "could not write %s\n", path.c_str());
    return 1;
  }
  std::printf("wrote %s\n", path.c_str());
  return 0;
}
