// The chunked LM-head cross-entropy as a custom autograd function. When a gradient will be needed,
// forward already has each chunk's softmax in hand, so it forms d(loss)/d(hidden) there: the loss is
// the graph's last node, its upstream gradient is a scalar, and backward only has to scale the saved
// [rows, hidden] result. That saves one [rows, vocab] x [vocab, hidden] product per step (about 7% of
// a SmolLM2-shaped step's FLOPs) and backward never touches the LM head.
// The vocabulary-parallel form (each rank holds a slice of the LM head's rows) runs the same softmax
// in pieces: a rank's logits slice of every gathered row, combined through all-reduces of the row
// maxima, of the exp sums and of the target logits, and of each rank's share of d(loss)/d(hidden).
#include "model/chunked_loss.h"

#include <algorithm>

namespace qlora::model {
namespace {

// Both losses form their input gradient in forward: keep it for backward and return the loss (the
// summed negative log-likelihood, or its mean over rows).
torch::Tensor loss_keeping_gradient(torch::autograd::AutogradContext* context, const torch::Tensor& grad_hidden,
                                    double total, bool sum, int64_t rows, const torch::TensorOptions& options) {
  context->save_for_backward({grad_hidden});
  context->saved_data["sum"] = sum;
  context->saved_data["rows"] = rows;
  return torch::tensor(sum ? total : total / static_cast<double>(rows), options);
}

// Both losses return their input gradient saved in forward, scaled by the upstream scalar.
torch::autograd::variable_list saved_gradient_times(torch::autograd::AutogradContext* context,
                                                    const torch::autograd::variable_list& grad_outputs,
                                                    size_t non_tensor_inputs) {
  const auto grad_hidden = context->get_saved_variables()[0];
  const bool sum = context->saved_data["sum"].toBool();
  const auto rows = static_cast<double>(context->saved_data["rows"].toInt());
  const auto scale = grad_outputs[0] / (sum ? 1.0 : rows);
  torch::autograd::variable_list result = {grad_hidden * scale};
  result.resize(1 + non_tensor_inputs);
  return result;
}

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
    return loss_keeping_gradient(context, grad_hidden, total, sum, rows, hidden.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    return saved_gradient_times(context, grad_outputs, 4);
  }
};

struct VocabParallelCrossEntropy : public torch::autograd::Function<VocabParallelCrossEntropy> {
  static torch::Tensor forward(torch::autograd::AutogradContext* context, torch::Tensor hidden, torch::Tensor weight,
                               torch::Tensor targets, int64_t vocab_begin, int64_t communicator_address, bool sum,
                               int64_t chunk_rows) {
    TORCH_CHECK(!weight.requires_grad(), "vocab_parallel_cross_entropy: the LM head weight must be frozen");
    auto& communicator = *reinterpret_cast<cluster::Communicator*>(communicator_address);
    const bool needs_gradient = hidden.requires_grad();
    const int64_t rows = hidden.size(0);
    const auto compute_weight = weight.to(hidden.scalar_type());
    const int64_t slice_rows = compute_weight.size(0);
    int64_t own_begin = 0;
    const auto all_hidden = all_gather_rows(hidden.detach(), communicator, &own_begin);
    const auto all_targets = all_gather_rows(targets.to(torch::kLong), communicator, &own_begin);
    const int64_t own_end = own_begin + rows;
    torch::Tensor grad_hidden = needs_gradient ? torch::empty_like(hidden) : torch::Tensor();
    double total = 0.0;
    for (int64_t begin = 0; begin < all_hidden.size(0); begin += chunk_rows) {
      const int64_t count = std::min(chunk_rows, all_hidden.size(0) - begin);
      auto logits = torch::matmul(all_hidden.narrow(0, begin, count), compute_weight.t());
      auto row_max = logits.amax(1).contiguous();
      communicator.all_reduce(row_max.data_ptr<float>(), count, cluster::ReduceOp::max);
      // The target's logit comes from the one rank whose slice holds it; the others add zero.
      const auto chunk_targets = all_targets.narrow(0, begin, count);
      const auto owned = chunk_targets.ge(vocab_begin).logical_and(chunk_targets.lt(vocab_begin + slice_rows));
      const auto local_index = (chunk_targets - vocab_begin).clamp(0, slice_rows - 1);
      const auto target_shifted =
          (logits.gather(1, local_index.unsqueeze(1)).squeeze(1) - row_max).masked_fill_(owned.logical_not(), 0.0);
      // exp(logit - max) in place: the chunk's only [rows, slice] tensor.
      auto exponentials = logits.sub_(row_max.unsqueeze(1)).exp_();
      auto statistics = torch::stack({exponentials.sum(1), target_shifted});
      communicator.all_reduce(statistics.data_ptr<float>(), statistics.numel(), cluster::ReduceOp::sum);
      const auto exp_sums = statistics[0];
      // This rank's own rows within the chunk.
      const int64_t mine_begin = std::max(begin, own_begin);
      const int64_t mine_count = std::min(begin + count, own_end) - mine_begin;
      if (mine_count > 0) {
        const auto log_probabilities = statistics[1] - exp_sums.log();
        total -= log_probabilities.narrow(0, mine_begin - begin, mine_count).sum().item<double>();
      }
      if (!needs_gradient) continue;
      // This rank's share of d(sum of losses)/d(hidden) = (softmax slice - onehot slice) @ weight slice,
      // formed as (exp @ weight) / exp sum minus the target rows this rank holds, so that no further
      // pass over the [rows, slice] tensor is needed.
      auto partial = torch::matmul(exponentials, compute_weight).div_(exp_sums.unsqueeze(1));
      const auto owned_rows = owned.nonzero().squeeze(1);
      partial.index_add_(0, owned_rows, compute_weight.index_select(0, local_index.index_select(0, owned_rows)).neg());
      partial = partial.contiguous();
      communicator.all_reduce(partial.data_ptr<float>(), partial.numel(), cluster::ReduceOp::sum);
      if (mine_count > 0)
        grad_hidden.narrow(0, mine_begin - own_begin, mine_count).copy_(partial.narrow(0, mine_begin - begin, mine_count));
    }
    return loss_keeping_gradient(context, grad_hidden, total, sum, rows, hidden.options());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* context,
                                                 torch::autograd::variable_list grad_outputs) {
    return saved_gradient_times(context, grad_outputs, 6);
  }
};

}  // namespace

torch::Tensor all_gather_rows(const torch::Tensor& local, cluster::Communicator& communicator, int64_t* offset) {
  const int world = communicator.size();
  const auto contiguous = local.contiguous();
  int64_t own_rows = contiguous.size(0);
  std::vector<int64_t> rows(static_cast<size_t>(world), 0);
  communicator.all_gather(&own_rows, rows.data(), std::vector<int64_t>(static_cast<size_t>(world), sizeof(int64_t)));
  int64_t row_bytes = contiguous.element_size();
  for (int64_t dimension = 1; dimension < contiguous.dim(); ++dimension) row_bytes *= contiguous.size(dimension);
  std::vector<int64_t> byte_counts;
  int64_t total_rows = 0;
  *offset = 0;
  for (int r = 0; r < world; ++r) {
    byte_counts.push_back(rows[static_cast<size_t>(r)] * row_bytes);
    if (r < communicator.rank()) *offset += rows[static_cast<size_t>(r)];
    total_rows += rows[static_cast<size_t>(r)];
  }
  auto sizes = contiguous.sizes().vec();
  sizes[0] = total_rows;
  auto gathered = torch::empty(sizes, contiguous.options());
  communicator.all_gather(contiguous.data_ptr(), gathered.data_ptr(), byte_counts);
  return gathered;
}

torch::Tensor vocab_parallel_embedding(const torch::Tensor& weight_slice, const shard::VocabRange& vocab,
                                       const torch::Tensor& tokens, cluster::Communicator& communicator) {
  if (communicator.size() == 1) return torch::embedding(weight_slice, tokens).to(torch::kFloat);
  // -0.0 where this rank does not hold the row: it is the exact identity of IEEE addition, so the
  // all-reduced sum is bitwise the owning rank's row.
  int64_t own_begin = 0;
  const auto all_tokens = all_gather_rows(tokens.reshape({-1}).to(torch::kLong), communicator, &own_begin);
  const auto owned = all_tokens.ge(vocab.begin).logical_and(all_tokens.lt(vocab.end));
  auto rows = torch::embedding(weight_slice, (all_tokens - vocab.begin).clamp(0, vocab.rows() - 1))
                  .to(torch::kFloat)
                  .contiguous();
  rows.masked_fill_(owned.logical_not().unsqueeze(1), -0.0);
  communicator.all_reduce(rows.data_ptr<float>(), rows.numel(), cluster::ReduceOp::sum);
  auto sizes = tokens.sizes().vec();
  sizes.push_back(weight_slice.size(1));
  return rows.narrow(0, own_begin, tokens.numel()).clone().view(sizes);
}

torch::Tensor vocab_parallel_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight_slice,
                                           int64_t vocab_begin, int64_t vocab_size, const torch::Tensor& targets,
                                           cluster::Communicator& communicator, bool sum, int64_t chunk_rows) {
  if (communicator.size() == 1) return chunked_cross_entropy(hidden, weight_slice, targets, sum, chunk_rows);
  TORCH_CHECK(hidden.scalar_type() == torch::kFloat, "vocab_parallel_cross_entropy: hidden states must be fp32");
  // The largest slice sets the chunk, so every rank runs the same chunks and collectives.
  if (chunk_rows <= 0) chunk_rows = default_chunk_rows(shard::vocab_range(vocab_size, 0, communicator.size()).rows());
  return VocabParallelCrossEntropy::apply(hidden, weight_slice, targets, vocab_begin,
                                          reinterpret_cast<int64_t>(&communicator), sum, chunk_rows);
}

int64_t default_chunk_rows(int64_t vocab, int64_t target_bytes) {
  return std::max<int64_t>(1, target_bytes / (vocab * static_cast<int64_t>(sizeof(float))));
}

torch::Tensor chunked_cross_entropy(const torch::Tensor& hidden, const torch::Tensor& weight,
                                    const torch::Tensor& targets, bool sum, int64_t chunk_rows) {
  if (chunk_rows <= 0) chunk_rows = default_chunk_rows(weight.size(0));
  return ChunkedCrossEntropy::apply(hidden, weight, targets, sum, chunk_rows);
}

}  // namespace qlora::model
