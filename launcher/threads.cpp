// Per-rank thread budgets, applied to the three pools a rank computes on.
#include "launcher/threads.h"

#include <dlfcn.h>
#include <torch/torch.h>

#include <algorithm>
#include <thread>

#include "kernels/parallel.h"

namespace qlora::launcher {

int threads_per_rank(int requested, int cores, int ranks_on_node) {
  if (requested > 0) return requested;
  return std::max(1, cores / std::max(1, ranks_on_node));
}

void apply_thread_count(int threads) {
  kernels::set_kernel_threads(threads);  // the dequantization pool, too, gets only this rank's share
  // OpenBLAS sizes its pool at load time from the whole machine; shrink it to our share. Looked up
  // dynamically because the BLAS behind LibTorch may not be OpenBLAS.
  using SetThreads = void (*)(int);
  auto set_blas_threads = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (set_blas_threads != nullptr) {
    set_blas_threads(threads);
    // With OpenBLAS doing the GEMMs, ATen's OpenMP workers spin between ops and steal the cores
    // OpenBLAS's own threads need: measured here (2 cores, 1024x256x256 fp32 GEMM + SiLU) 70 GFLOP/s
    // with one ATen thread against 26 with two. Element-wise ops stay single-threaded.
    torch::set_num_threads(1);
  } else {
    torch::set_num_threads(threads);
  }
}

int assign_threads(const cluster::RankLayout& layout, int requested) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = threads_per_rank(requested, cores, layout.local_size);
  apply_thread_count(threads);
  return threads;
}

}  // namespace qlora::launcher
