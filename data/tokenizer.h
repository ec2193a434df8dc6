// Tokenizers: text to token ids and back, with the ids the model was trained on. Three kinds:
// byte tokens (synthetic models), byte-level BPE (GPT-2 / SmolLM2 / Llama 3 style, loaded from a
// Hugging Face tokenizer.json or from GGUF tokenizer.ggml.* metadata) and SentencePiece models
// (.model, through libsentencepiece). A model store carries its tokenizer's source bytes
// (shard/tokenizer_source.h, docs/FORMAT.md /tokenizer); load_store_tokenizer() builds it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "shard/tokenizer_source.h"

namespace qlora::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids for `text` as the reference implementation gives them with add_special_tokens=False:
  // special tokens written in the text are recognised, none are added. Safe to call from several
  // threads at once (the token cache encodes pieces of a corpus in parallel).
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // One past the largest id the tokenizer can produce.
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;   // -1 when the tokenizer has none
  virtual int32_t eos_id() const = 0;   // -1 when the tokenizer has none
  virtual std::string kind() const = 0;  // "bytes", "tokenizer.json", "gguf" or "sentencepiece"
  // Whether the reference tokenizer(text) (add_special_tokens=True, as TRL tokenizes plain-text
  // records) puts the bos token first: a tokenizer.json TemplateProcessing post-processor that starts
  // with it, or GGUF tokenizer.ggml.add_bos_token. False where the source does not say.
  virtual bool adds_bos() const { return false; }
};

std::unique_ptr<Tokenizer> make_byte_tokenizer();
// Throws FormatError naming `where` for malformed input or a tokenizer qlora cannot reproduce
// (another model type, a normalizer, an unknown pre-tokenizer expression, ...).
std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& json_text, const std::string& where);
std::unique_ptr<Tokenizer> load_gguf_tokenizer(const shard::GgufFile& file);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_bytes, const std::string& where);
bool sentencepiece_available();  // false when built without libsentencepiece
// Dispatches on source.kind ("bytes" needs no bytes).
std::unique_ptr<Tokenizer> load_tokenizer(const shard::TokenizerSource& source, const std::string& where);

// The converter's shard::TokenizerCheck: throws FormatError when `source` does not load. A
// SentencePiece model passes unchecked when the SentencePiece module is unavailable (loading it
// later names what is missing).
void check_tokenizer(const shard::TokenizerSource& source, const std::string& where);

// The store's tokenizer (shard::store_tokenizer_source), built.
std::unique_ptr<Tokenizer> load_store_tokenizer(const shard::ModelStore& store);

}  // namespace qlora::data
