// NCCL implementation of Communicator. A variable-count all-gather is a grouped set of broadcasts
// (NCCL's all-gather needs equal counts); completion is tracked with a CUDA event per collective.
#include "cluster/nccl_communicator.h"

#include "cluster/mpi_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace qlora::cluster {
namespace {

[[noreturn]] void fail(MPI_Comm control, int rank, const char* call, const char* reason, ncclComm_t comm) {
  std::fprintf(stderr, "[rank %d] error: %s failed: %s; aborting every rank\n", rank, call, reason);
  std::fflush(stderr);
  if (comm != nullptr) ncclCommAbort(comm);
  MPI_Abort(control, 3);
  std::abort();
}

class NcclPending final : public PendingCollective {
 public:
  explicit NcclPending(cudaEvent_t event) : event_(event) {}
  ~NcclPending() override {
    wait();
    cudaEventDestroy(event_);
  }
  void wait() override {
    if (!done_) cudaEventSynchronize(event_);
    done_ = true;
  }
  bool test() override { return done_ || cudaEventQuery(event_) == cudaSuccess; }

 private:
  cudaEvent_t event_;
  bool done_ = false;
};

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(MPI_Comm control, int device) : control_(control) {
    MPI_Comm_rank(control_, &rank_);
    MPI_Comm_size(control_, &size_);
    check_cuda(cudaSetDevice(device), "cudaSetDevice");
    ncclUniqueId id;
    if (rank_ == 0) check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, control_);
    check_nccl(ncclCommInitRank(&comm_, size_, id, rank_), "ncclCommInitRank");
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
  }
  ~NcclCommunicator() override {
    if (comm_ != nullptr) ncclCommDestroy(comm_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "nccl"; }

  std::unique_ptr<PendingCollective> all_gather_async(const void* send, void* recv,
                                                      const std::vector<int64_t>& counts) override {
    auto* destination = static_cast<uint8_t*>(recv);
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    int64_t offset = 0;
    for (int root = 0; root < size_; ++root) {
      check_nccl(ncclBroadcast(root == rank_ ? send : nullptr, destination + offset, static_cast<size_t>(counts[root]),
                               ncclUint8, root, comm_, stream_),
                 "ncclBroadcast (all-gather)");
      offset += counts[root];
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd (all-gather)");
    return record();
  }

  std::unique_ptr<PendingCollective> all_reduce_async(float* data, int64_t count, ReduceOp op) override {
    check_nccl(ncclAllReduce(data, data, static_cast<size_t>(count), ncclFloat,
                             op == ReduceOp::average ? ncclAvg : op == ReduceOp::max ? ncclMax : ncclSum, comm_, stream_),
               "ncclAllReduce");
    return record();
  }

  void broadcast(void* data, int64_t bytes, int root) override {
    check_nccl(ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8, root, comm_, stream_),
               "ncclBroadcast");
    check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (broadcast)");
  }

  void barrier() override { MPI_Barrier(control_); }

  std::vector<std::string> gather_to_root(const std::string& record_text) override {
    return gather_records_to_root(control_, record_text);
  }

  [[noreturn]] void abort(int exit_code) override {
    if (comm_ != nullptr) ncclCommAbort(comm_);
    MPI_Abort(control_, exit_code);
    std::abort();
  }

 private:
  std::unique_ptr<PendingCollective> record() {
    cudaEvent_t event;
    check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventRecord(event, stream_), "cudaEventRecord");
    return std::make_unique<NcclPending>(event);
  }
  void check_nccl(ncclResult_t result, const char* call) {
    if (result != ncclSuccess) fail(control_, rank_, call, ncclGetErrorString(result), comm_);
  }
  void check_cuda(cudaError_t result, const char* call) {
    if (result != cudaSuccess) fail(control_, rank_, call, cudaGetErrorString(result), comm_);
  }

  MPI_Comm control_;
  int rank_ = 0;
  int size_ = 1;
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm control, int device) {
  return std::make_unique<NcclCommunicator>(control, device);
}

}  // namespace qlora::cluster
