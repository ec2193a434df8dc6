// A small persistent worker pool for the CPU kernels: large tensors are cut into chunks of whole
// quantization blocks and spread over threads. Ranks sharing a node set the thread count so they do
// not oversubscribe each other's cores.
#pragma once

#include <cstdint>
#include <functional>

namespace qlora::kernels {

// 0 (the default) means std::thread::hardware_concurrency().
void set_kernel_threads(int threads);
int kernel_threads();

// Runs body(begin, end) over disjoint ranges covering [0, count), each at least min_chunk long
// (except the last), on up to kernel_threads() threads including the caller. Returns when all are
// done. A call made while the pool is busy (another thread, or from inside a body) runs inline.
void parallel_for(int64_t count, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& body);

}  // namespace qlora::kernels
