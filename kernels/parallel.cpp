// Persistent worker pool behind parallel_for (parallel.h). Threads are started on first use and kept,
// because starting threads per call costs more than dequantizing a few MiB.
#include "kernels/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace qlora::kernels {
namespace {

std::atomic<int> configured_threads{0};
thread_local bool inside_parallel_body = false;  // a nested parallel_for runs inline

class WorkerPool {
 public:
  static WorkerPool& instance() {
    static WorkerPool pool;
    return pool;
  }

  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  // False when another job holds the pool; the caller then runs the loop itself.
  bool try_run(int64_t count, int64_t chunk, int threads, const std::function<void(int64_t, int64_t)>& body) {
    std::unique_lock<std::mutex> job_lock(job_mutex_, std::try_to_lock);
    if (!job_lock.owns_lock()) return false;
    const int helpers = threads - 1;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < helpers) workers_.emplace_back([this] { worker_loop(); });
      body_ = &body;
      count_ = count;
      chunk_ = chunk;
      next_.store(0);
      invited_ = helpers;
      running_ = helpers;
      ++generation_;
    }
    wake_.notify_all();
    run_chunks();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return running_ == 0; });
    body_ = nullptr;
    return true;
  }

 private:
  void run_chunks() {
    inside_parallel_body = true;
    for (;;) {
      const int64_t begin = next_.fetch_add(chunk_);
      if (begin >= count_) break;
      (*body_)(begin, std::min(count_, begin + chunk_));
    }
    inside_parallel_body = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return stopping_ || (generation_ != seen && invited_ > 0); });
      if (stopping_) return;
      seen = generation_;
      --invited_;
      lock.unlock();
      run_chunks();
      lock.lock();
      if (--running_ == 0) done_.notify_one();
    }
  }

  std::mutex job_mutex_;  // one job at a time
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  int64_t chunk_ = 1;
  std::atomic<int64_t> next_{0};
  int invited_ = 0;  // workers still to join the current job
  int running_ = 0;  // invited workers not yet finished with it
  uint64_t generation_ = 0;
  bool stopping_ = false;
};

}  // namespace

void set_kernel_threads(int threads) { configured_threads.store(std::max(0, threads)); }

int kernel_threads() {
  const int configured = configured_threads.load();
  if (configured > 0) return configured;
  return std::max(1u, std::thread::hardware_concurrency());
}

void parallel_for(int64_t count, int64_t min_chunk, const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  min_chunk = std::max<int64_t>(1, min_chunk);
  const int64_t useful = (count + min_chunk - 1) / min_chunk;
  const int threads = static_cast<int>(std::min<int64_t>(kernel_threads(), useful));
  if (threads <= 1 || inside_parallel_body) {
    body(0, count);
    return;
  }
  // A few chunks per thread so a slow thread (or one sharing its core) does not hold up the rest.
  const int64_t chunk = std::max(min_chunk, (count + threads * 4 - 1) / (threads * 4));
  if (!WorkerPool::instance().try_run(count, chunk, threads, body)) body(0, count);
}

}  // namespace qlora::kernels
