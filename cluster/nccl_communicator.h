// NCCL backend of Communicator: buffers are CUDA device pointers. MPI carries the unique id and the
// control records; compiled only when the CUDA toolkit and NCCL are found (QLORA_HAVE_NCCL).
#pragma once

#include <mpi.h>

#include <memory>

#include "cluster/communicator.h"

namespace qlora::cluster {

// Binds this rank to CUDA device `device`, creates the NCCL communicator over the ranks of
// `control` and a dedicated stream for collectives.
std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm control, int device);

}  // namespace qlora::cluster
