// `qlora generate`: text from a model store with or without a PEFT adapter, one rank or sharded over
// several (every rank computes, rank 0 prints). Three modes: a raw prompt continued and streamed,
// a JSONL file of prompts or conversations answered one JSON line each, and an interactive chat on
// stdin through the model's chat template.
#pragma once

#include <cstdint>
#include <iosfwd>
#include <string>
#include <vector>

#include "cluster/communicator.h"
#include "data/tokenizer.h"
#include "model/generation.h"

namespace qlora::launcher {

struct GenerateOptions {
  std::string model_path;
  std::string adapter_dir;         // empty: the base model
  std::string prompt;              // --prompt mode when input_path is empty and chat is false
  std::string input_path;          // --input FILE.jsonl
  bool chat = false;               // --chat
  std::string chat_template_path;  // overrides the store's template
  bool add_bos = false;            // prepend the tokenizer's bos to raw prompts
  int64_t max_new_tokens = 128;
  model::SamplingOptions sampling;
};

struct GenerationStats {
  int64_t prefill_tokens = 0;
  double prefill_seconds = 0;
  int64_t decode_tokens = 0;  // tokens run through the model one at a time
  double decode_seconds = 0;
};

// What one completion produced: the new token ids (without the stop token) and their text.
struct Completion {
  std::vector<int64_t> tokens;
  std::string text;
  bool stopped = false;  // ended at a stop token rather than at max_new_tokens
};

// Generates after `prompt` on `decoder`, whose cache already holds `prompt`'s first
// decoder.length() tokens (the rest are appended first). Collective: every rank runs it with the
// same arguments and gets the same tokens (rank 0's choice is broadcast). With `stream`, rank 0
// writes the text as it grows, never half a UTF-8 character.
Completion generate_completion(model::CachedDecoder& decoder, const data::Tokenizer& tokenizer,
                               const std::vector<int64_t>& prompt, const std::vector<int64_t>& stop_tokens,
                               int64_t max_new_tokens, model::TokenSampler& sampler,
                               cluster::Communicator& communicator, std::ostream* stream, GenerationStats* stats);

// The ids generation stops at: the tokenizer's eos and the end-of-turn tokens of the common chat
// formats (<|im_end|>, <|eot_id|>, <end_of_turn>, <|end|>, <|endoftext|>) the vocabulary holds as
// single tokens.
std::vector<int64_t> stop_token_ids(const data::Tokenizer& tokenizer);

// The length of `text`'s longest prefix that ends on a complete UTF-8 character and not in U+FFFD
// (what a decoder shows for a character whose remaining bytes are still to come).
size_t printable_prefix_length(const std::string& text);

// Runs the command; returns the exit code.
int run_generation(const GenerateOptions& options, cluster::Communicator& communicator);

}  // namespace qlora::launcher
