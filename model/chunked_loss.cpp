// The chunked LM-head cross-entropy as a custom autograd function. When a gradient will be needed,
// forward already has each chunk's softmax in hand, so it forms d(loss)/d(hidden) there: the loss is
// the graph's last node, its upstream gradient is a scalar, and backward only has to scale the saved
// [rows, hidden] result. That saves one [rows, vocab] x [vocab, hidden] product per step (about 7% of
// a SmolLM2-shaped step's FLOPs) and backward never touches the LM head.
#include "model/chunked_loss.h"

#include <algorithm>

namespace qlora::model {
namespace {

struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor hidden, torch::Tensor weight,
                               torch::Tensor targets, bool sum, int64_t chunk_rows) {
    TORCH_CHECK(!weight.requires_grad(), "chunked_cross_entropy: the LM head weight must be frozen");
    const bool needs_gradient = hidden.requires_grad();
    const int64_t rows = hidden.size(0);
    const auto compute_weight = weight.to(hidden.scalar_type());
    torch::Tensor grad_hidden = needs_gradient ? torch::empty_like(hidden) : torch::Tensor();
    double total = 0.0;
    for (int64_t begin = 0; begin < rows; begin += chunk_rows) {
      const int64_t count = std::min(chunk_rows, rows - begin);
      auto chunk_targets = targets.narrow(0, begin, count).unsqueeze(1);
      auto log_probabilities = torch::log_softmax(torch::matmul(hidden.narrow(0, begin, count), compute_weight.t()), -1);
      total -= log_probabilities.gather(1, chunk_targets).sum().item<double>();
      if (!needs_gradient) continue;
      // d(sum of losses)/d(logits) = softmax - onehot(target), formed in place.
      auto probabilities = log_probabilities.exp_();
      probabilities.scatter_add_(1, chunk_targets, torch::full({count, 1}, -1.0, probabilities.options()));
      grad_hidden.narrow(0, begin, count).copy_(torch::matmul(probabilities, compute_weight));
    }
    context->save_for_backward({grad_hidden});
    context->saved_data["sum"] = sum;
    context->saved_data["rows"] = rows;
    return torch::tensor(sum ? total : total / static_cast<double>(rows), hidden.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto grad_hidden = context->get_saved_variables()[0];
    const bool sum = context->saved_data["sum"].toBool();
    const auto rows = static_cast<double>(context->saved_data["rows"].toInt());
    const auto scale = grad_outputs[0] / (sum ? 1.0 : rows);
    return {grad_hidden * scale, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

int64_t default_chunk_rows(int64_t vocab, int64_t target_bytes) {
  return std::max<int64_t>(1, target_bytes / (vocab * static_cast<int64_t>(sizeof(float))));
}

torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                    const torch::Tensor& targets, bool sum, int64_t chunk_rows) {
  if (chunk_rows <= 0) chunk_rows = default_chunk_rows(weight.size(0));
  return ChunkedCrossEntropy::apply(hidden, weight, targets, sum, chunk_rows);
}

}  // namespace qlora::model
