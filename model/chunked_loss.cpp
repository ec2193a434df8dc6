// The chunked LM-head cross-entropy as a custom autograd function.
#include "model/chunked_loss.h"

#include <algorithm>

namespace qlora::model {
namespace {

struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor hidden, torch::Tensor weight,
                               torch::Tensor targets, bool sum, int64_t chunk_rows) {
    TORCH_CHECK(!weight.requires_grad(), "chunked_cross_entropy: the LM head weight must be frozen");
    const int64_t rows = hidden.size(0);
    const auto compute_weight = weight.to(hidden.scalar_type());
    double total = 0.0;
    for (int64_t begin = 0; begin < rows; begin += chunk_rows) {
      const int64_t count = std::min(chunk_rows, rows - begin);
      auto logits = torch::matmul(hidden.narrow(0, begin, count), compute_weight.t());
      total += torch::nn::functional::cross_entropy(
                   logits, targets.narrow(0, begin, count),
                   torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                   .item<double>();
    }
    context->save_for_backward({hidden, weight, targets});
    context->saved_data["sum"] = sum;
    context->saved_data["chunk_rows"] = chunk_rows;
    return torch::tensor(sum ? total : total / static_cast<double>(rows), hidden.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    const auto saved = context->get_saved_variables();
    const auto& hidden = saved[0];
    const auto compute_weight = saved[1].to(hidden.scalar_type());
    const auto& targets = saved[2];
    const bool sum = context->saved_data["sum"].toBool();
    const int64_t chunk_rows = context->saved_data["chunk_rows"].toInt();
    const int64_t rows = hidden.size(0);
    // d(loss)/d(logits) = softmax(logits) - onehot(target), scaled by the upstream gradient (and 1/rows).
    const auto scale = grad_outputs[0] / (sum ? 1.0 : static_cast<double>(rows));
    auto grad_hidden = torch::empty_like(hidden);
    for (int64_t begin = 0; begin < rows; begin += chunk_rows) {
      const int64_t count = std::min(chunk_rows, rows - begin);
      auto probabilities = torch::softmax(torch::matmul(hidden.narrow(0, begin, count), compute_weight.t()), -1);
      auto chunk_targets = targets.narrow(0, begin, count);
      probabilities.scatter_add_(1, chunk_targets.unsqueeze(1),
                                 torch::full({count, 1}, -1.0, probabilities.options()));
      probabilities.mul_(scale);
      grad_hidden.narrow(0, begin, count).copy_(torch::matmul(probabilities, compute_weight));
    }
    return {grad_hidden, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
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
