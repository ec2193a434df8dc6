// Byte-level BPE as Hugging Face `tokenizers` runs it for GPT-2, SmolLM2 and Llama 3: added tokens
// are cut out of the text first, the rest is split by the pre-tokenizer's expressions, each piece's
// UTF-8 bytes become GPT-2's printable byte characters, and merges apply by rank. Both loaders
// (tokenizer.json and GGUF metadata) fill a BpeSpec; the expressions are hand-written matchers of
// the few patterns these models use, since no regex library here knows \p{L} and \p{N}.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/tokenizer.h"

namespace qlora::data {

enum class PreTokenizerStep {
  digits_individual,   // Digits(individual_digits=true): every \p{N} code point alone
  digits_contiguous,   // Digits(individual_digits=false): runs of \p{N}
  gpt2_expression,     // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  llama3_expression,   // (?i:'s|...|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|...
};

struct AddedToken {
  int32_t id = 0;
  std::string content;
  bool special = true;   // special tokens are cut out before the others, as tokenizers does
  bool lstrip = false;   // swallow white space to the left / right
  bool rstrip = false;
};

struct BpeSpec {
  std::string kind;                        // "tokenizer.json" or "gguf"
  std::vector<std::string> tokens;         // id -> token text in byte-character form ("" = unused id)
  std::vector<std::pair<std::string, std::string>> merges;   // by rank
  std::vector<AddedToken> added_tokens;
  std::vector<PreTokenizerStep> steps;
  bool add_prefix_space = false;           // ByteLevel(add_prefix_space=true): a space before each piece
  bool ignore_merges = false;              // a piece that is itself a token is emitted whole
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  bool adds_bos = false;                   // Tokenizer::adds_bos
};

// Throws FormatError naming `where` when the vocabulary lacks a byte's token, a merge names an unknown
// token, or ids collide.
std::unique_ptr<Tokenizer> make_byte_level_bpe(BpeSpec spec, const std::string& where);

// Splits text into the pieces BPE encodes separately, as byte ranges [first, second); exposed for tests.
std::vector<std::pair<size_t, size_t>> pre_tokenize(std::string_view text, const std::vector<PreTokenizerStep>& steps);

}  // namespace qlora::data
