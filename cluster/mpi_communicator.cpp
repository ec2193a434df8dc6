// MPI implementation of Communicator. Averaging divides after the sum so every backend averages the
// same way; counts above 2^31 bytes are rejected by an assert (MPI int counts), see DESIGN notes.
// With more than one rank it owns a FaultWatchdog, and every blocking wait is bracketed for it, so a
// lost rank or a wait past --collective-timeout aborts the job instead of hanging it.
#include "cluster/mpi_communicator.h"

#include <algorithm>
#include <cassert>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "cluster/fault_watchdog.h"

namespace qlora::cluster {

double Communicator::all_reduce_scalar(double value, ReduceOp op) {
  // Every rank's double, combined in rank order: exact for max, double precision for sums, the same
  // bits on every rank, and any backend's all-gather serves (a float all-reduce of a head and a
  // residual kept only float precision and could return a max above every input).
  const int world = size();
  std::vector<double> values(static_cast<size_t>(world));
  all_gather(&value, values.data(), std::vector<int64_t>(static_cast<size_t>(world), sizeof(double)));
  double result = values[0];
  for (int rank = 1; rank < world; ++rank)
    result = op == ReduceOp::max ? std::max(result, values[rank]) : result + values[rank];
  return op == ReduceOp::average ? result / world : result;
}

namespace {

// Every MPI call goes through this: a failure names this rank and the call, then ends the whole job
// (the communicator runs with MPI_ERRORS_RETURN so the failure reaches us instead of MPI's handler).
void check_mpi(int result, const char* call, MPI_Comm comm) {
  if (result == MPI_SUCCESS) return;
  int rank = -1;
  MPI_Comm_rank(comm, &rank);
  char reason[MPI_MAX_ERROR_STRING] = {0};
  int length = 0;
  MPI_Error_string(result, reason, &length);
  std::fprintf(stderr, "[rank %d] error: %s failed: %s; aborting every rank\n", rank, call, reason);
  std::fflush(stderr);
  MPI_Abort(comm, 3);
  std::abort();
}

// Averaging is a sum followed by a scale (see the file comment).
MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::max ? MPI_MAX : MPI_SUM; }

class MpiPending final : public PendingCollective {
 public:
  MpiPending(MPI_Comm comm, FaultWatchdog* watchdog, const char* call, float* scale_data, int64_t scale_count,
             float scale)
      : comm_(comm), watchdog_(watchdog), call_(call), scale_data_(scale_data), scale_count_(scale_count), scale_(scale) {}
  MPI_Request* request() { return &request_; }
  // MPI reads a non-blocking gather's count arrays until it completes, so they live here.
  std::vector<int> counts;
  std::vector<int> displacements;
  ~MpiPending() override {
    if (!done_) wait();
  }
  void wait() override {
    if (done_) return;
    CollectiveWait waiting(watchdog_, call_);
    check_mpi(MPI_Wait(&request_, MPI_STATUS_IGNORE), "MPI_Wait", comm_);
    finish();
  }
  bool test() override {
    if (done_) return true;
    int complete = 0;
    check_mpi(MPI_Test(&request_, &complete, MPI_STATUS_IGNORE), "MPI_Test", comm_);
    if (complete) finish();
    return complete != 0;
  }

 private:
  void finish() {
    done_ = true;
    if (scale_data_ != nullptr)
      for (int64_t i = 0; i < scale_count_; ++i) scale_data_[i] *= scale_;
  }
  MPI_Comm comm_;
  FaultWatchdog* watchdog_;
  const char* call_;  // what a stuck wait() is reported as
  MPI_Request request_ = MPI_REQUEST_NULL;
  float* scale_data_;
  int64_t scale_count_;
  float scale_;
  bool done_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : comm_(comm) {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    if (size_ > 1) watchdog_ = std::make_unique<FaultWatchdog>(comm_, FaultWatchdogSettings::from_environment());
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  std::unique_ptr<PendingCollective> all_gather_async(const void* send, void* recv,
                                                      const std::vector<int64_t>& counts) override {
    assert(static_cast<int>(counts.size()) == size_);
    auto pending = std::make_unique<MpiPending>(comm_, watchdog_.get(), "MPI_Wait (all-gather)", nullptr, 0, 1.0f);
    pending->counts.assign(size_, 0);
    pending->displacements.assign(size_, 0);
    int64_t offset = 0;
    for (int r = 0; r < size_; ++r) {
      assert(counts[r] <= INT_MAX && offset <= INT_MAX);
      pending->counts[r] = static_cast<int>(counts[r]);
      pending->displacements[r] = static_cast<int>(offset);
      offset += counts[r];
    }
    check_mpi(MPI_Iallgatherv(send, pending->counts[rank_], MPI_BYTE, recv, pending->counts.data(),
                              pending->displacements.data(), MPI_BYTE, comm_, pending->request()),
              "MPI_Iallgatherv", comm_);
    return pending;
  }

  std::unique_ptr<PendingCollective> all_reduce_async(float* data, int64_t count, ReduceOp op) override {
    assert(count <= INT_MAX);
    const bool average = op == ReduceOp::average && size_ > 1;
    auto pending = std::make_unique<MpiPending>(comm_, watchdog_.get(), "MPI_Wait (all-reduce)",
                                                average ? data : nullptr, count, 1.0f / static_cast<float>(size_));
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_FLOAT, mpi_op(op), comm_,
                             pending->request()),
              "MPI_Iallreduce", comm_);
    return pending;
  }

  void all_gather(const void* send, void* recv, const std::vector<int64_t>& counts) override {
    assert(static_cast<int>(counts.size()) == size_);
    std::vector<int> counts_int(size_);
    std::vector<int> displacements(size_);
    int64_t offset = 0;
    bool equal = true;
    for (int r = 0; r < size_; ++r) {
      assert(counts[r] <= INT_MAX && offset <= INT_MAX);
      counts_int[r] = static_cast<int>(counts[r]);
      displacements[r] = static_cast<int>(offset);
      offset += counts[r];
      equal = equal && counts[r] == counts[0];
    }
    CollectiveWait waiting(watchdog_.get(), equal ? "MPI_Allgather" : "MPI_Allgatherv");
    if (equal)
      check_mpi(MPI_Allgather(send, counts_int[rank_], MPI_BYTE, recv, counts_int[0], MPI_BYTE, comm_), "MPI_Allgather",
                comm_);
    else
      check_mpi(MPI_Allgatherv(send, counts_int[rank_], MPI_BYTE, recv, counts_int.data(), displacements.data(),
                               MPI_BYTE, comm_),
                "MPI_Allgatherv", comm_);
  }

  void all_reduce(float* data, int64_t count, ReduceOp op) override {
    assert(count <= INT_MAX);
    CollectiveWait waiting(watchdog_.get(), "MPI_Allreduce");
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, data, static_cast<int>(count), MPI_FLOAT, mpi_op(op), comm_), "MPI_Allreduce",
              comm_);
    if (op == ReduceOp::average && size_ > 1) {
      const float scale = 1.0f / static_cast<float>(size_);
      for (int64_t i = 0; i < count; ++i) data[i] *= scale;
    }
  }

  void broadcast(void* data, int64_t bytes, int root) override {
    assert(bytes <= INT_MAX);
    CollectiveWait waiting(watchdog_.get(), "MPI_Bcast");
    check_mpi(MPI_Bcast(data, static_cast<int>(bytes), MPI_BYTE, root, comm_), "MPI_Bcast", comm_);
  }

  void barrier() override {
    CollectiveWait waiting(watchdog_.get(), "MPI_Barrier");
    check_mpi(MPI_Barrier(comm_), "MPI_Barrier", comm_);
  }

  std::vector<std::string> gather_to_root(const std::string& record) override {
    CollectiveWait waiting(watchdog_.get(), "MPI_Gatherv (control records)");
    return gather_records_to_root(comm_, record);
  }

  void set_collective_timeout(double seconds) override {
    if (watchdog_) watchdog_->set_collective_timeout(seconds);
  }
  double collective_timeout() const override { return watchdog_ ? watchdog_->collective_timeout() : 0.0; }

  void report_failure(const std::string& message, int exit_code) override {
    if (watchdog_) watchdog_->report_failure(message, exit_code);
  }

  [[noreturn]] void abort(int exit_code) override {
    MPI_Abort(comm_, exit_code);
    std::abort();
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
  std::unique_ptr<FaultWatchdog> watchdog_;  // with more than one rank
};

}  // namespace

std::vector<std::string> gather_records_to_root(MPI_Comm comm, const std::string& record) {
  int rank = 0;
  int size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  int length = static_cast<int>(record.size());
  std::vector<int> lengths(rank == 0 ? size : 0);
  check_mpi(MPI_Gather(&length, 1, MPI_INT, lengths.data(), 1, MPI_INT, 0, comm), "MPI_Gather", comm);
  std::vector<int> displacements(lengths.size(), 0);
  int total = 0;
  for (size_t r = 0; r < lengths.size(); ++r) {
    displacements[r] = total;
    total += lengths[r];
  }
  std::vector<char> buffer(static_cast<size_t>(total));
  check_mpi(MPI_Gatherv(record.data(), length, MPI_CHAR, buffer.data(), lengths.data(), displacements.data(), MPI_CHAR,
                        0, comm),
            "MPI_Gatherv", comm);
  std::vector<std::string> records;
  for (size_t r = 0; r < lengths.size(); ++r)
    records.emplace_back(buffer.data() + displacements[r], static_cast<size_t>(lengths[r]));
  return records;
}

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) { return std::make_unique<MpiCommunicator>(comm); }

}  // namespace qlora::cluster
