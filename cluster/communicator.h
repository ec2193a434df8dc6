// The one collective interface every layer above uses. Backends (one file each): MPI for CPU
// buffers, NCCL for CUDA buffers. MPI also carries control traffic (and NCCL's unique id).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace qlora::cluster {

// max serves the vocabulary-parallel softmax (each rank holds a slice of every row's logits).
enum class ReduceOp { sum, average, max };

// A collective in flight. wait() completes it (and applies averaging for all-reduce).
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual void wait() = 0;
  virtual bool test() = 0;  // drives progress; true once complete (wait() still required)
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;

  // Rank r contributes counts[r] bytes; recv receives them back to back in rank order.
  virtual std::unique_ptr<PendingCollective> all_gather_async(const void* send, void* recv,
                                                              const std::vector<int64_t>& counts) = 0;
  virtual std::unique_ptr<PendingCollective> all_reduce_async(float* data, int64_t count, ReduceOp op) = 0;
  virtual void broadcast(void* data, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Small control records (memory reports, checksums): rank 0 gets every rank's, others get {}.
  virtual std::vector<std::string> gather_to_root(const std::string& record) = 0;
  // Ends every rank of the job with `exit_code` after a failure on this one.
  [[noreturn]] virtual void abort(int exit_code) = 0;
  // Upper bound in seconds on one blocking wait for the other ranks (0: none); past it the job is
  // aborted naming the call. Backends without a watchdog ignore it.
  virtual void set_collective_timeout(double /*seconds*/) {}
  virtual double collective_timeout() const { return 0.0; }
  // This rank is about to exit with `exit_code` (not 0) because of `message`: backends with a fault
  // watchdog tell the other ranks, so those still working end the job with that code and message
  // instead of waiting in a collective. Backends without one ignore it.
  virtual void report_failure(const std::string& /*message*/, int /*exit_code*/) {}

  // Blocking forms. Backends override them when a blocking call is faster than wait(async) (MPI's
  // tuned blocking collectives beat its non-blocking ones by up to 2x here).
  virtual void all_gather(const void* send, void* recv, const std::vector<int64_t>& counts) {
    all_gather_async(send, recv, counts)->wait();
  }
  virtual void all_reduce(float* data, int64_t count, ReduceOp op) { all_reduce_async(data, count, op)->wait(); }
  // All-reduce of one scalar, for losses and flags.
  double all_reduce_scalar(double value, ReduceOp op);
};

// Lifts the collective timeout for a phase whose length grows with the data rather than with a
// fault (rank 0 tokenizing a corpus while the others wait for it); the watchdog still ends the
// job within seconds when a rank is lost. The previous bound returns when the phase ends.
class UnboundedWait {
 public:
  explicit UnboundedWait(Communicator& communicator)
      : communicator_(communicator), saved_seconds_(communicator.collective_timeout()) {
    communicator_.set_collective_timeout(0.0);
  }
  ~UnboundedWait() { communicator_.set_collective_timeout(saved_seconds_); }
  UnboundedWait(const UnboundedWait&) = delete;
  UnboundedWait& operator=(const UnboundedWait&) = delete;

 private:
  Communicator& communicator_;
  double saved_seconds_;
};

}  // namespace qlora::cluster
