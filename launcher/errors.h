// Setup phases run "collectively": every rank runs the phase, then all agree whether any failed, so
// an error seen by one rank (a file missing on one node) ends every rank instead of hanging them.
#pragma once

#include <functional>
#include <stdexcept>
#include <string>

#include "cluster/communicator.h"
#include "common/errors.h"

namespace qlora {

// Runs `phase` on every rank. If it throws a UserError (any kind: format, preparation, model)
// on any rank, every rank throws: rank 0 a UserError listing each distinct message with the
// ranks that saw it, the others a UserError marked reported. Other exceptions propagate unchanged.
void run_collectively(cluster::Communicator& communicator, const std::function<void()>& phase);

}  // namespace qlora
