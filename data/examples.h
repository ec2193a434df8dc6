// Instruction-tuning examples once tokenized: the unit the dataset readers (chat, prompt-completion,
// Alpaca, ShareGPT through the chat template) hand to batching, packing and the masked loss. Kept
// apart from both sides so readers and trainers agree on one type.
#pragma once

#include <cstdint>
#include <vector>

namespace qlora::data {

// One example: its tokens as the model sees them (bos/eos where the template or tokenizer puts
// them) and, per token, whether the loss predicts it. counted[i] = 1 means token i is a target
// (transformers' labels[i] != -100: predicted from tokens [0, i)); counted[0] is never used.
struct TokenizedExample {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> counted;
};

}  // namespace qlora::data
