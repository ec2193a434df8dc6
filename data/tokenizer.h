// Tokenizers: text to token ids and back, with the ids the model was trained on. Three kinds:
// byte tokens (synthetic models), byte-level BPE (GPT-2 / SmolLM2 / Llama 3 style, loaded from a
// Hugging Face tokenizer.json or from GGUF tokenizer.ggml.* metadata) and SentencePiece models
// (.model, through libsentencepiece). A model store carries its tokenizer's source bytes; see
// docs/FORMAT.md (/tokenizer) and load_store_tokenizer().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qlora::shard {

class GgufFile;
class ModelStore;

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Ids for `text` as the reference implementation gives them with add_special_tokens=False:
  // special tokens written in the text are recognised, none are added.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  // One past the largest id the tokenizer can produce.
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;   // -1 when the tokenizer has none
  virtual int32_t eos_id() const = 0;   // -1 when the tokenizer has none
  virtual std::string kind() const = 0;  // "bytes", "tokenizer.json", "gguf" or "sentencepiece"
};

// What a store embeds: the kind and the source bytes (tokenizer.json text, a GGUF image holding the
// tokenizer.* metadata, or a SentencePiece model). Empty kind: none.
struct TokenizerSource {
  std::string kind;
  std::string bytes;
  std::string bos_token;   // tokenizer.json only: tokenizer_config.json's names, "" when unknown
  std::string eos_token;
  // FNV-1a 64 over all of the above, hex: identifies the tokenizer for token caches.
  std::string checksum() const;
};

std::unique_ptr<Tokenizer> make_byte_tokenizer();
// Throws FormatError naming `where` for malformed input or a tokenizer qlora cannot reproduce
// (another model type, a normalizer, an unknown pre-tokenizer expression, ...).
std::unique_ptr<Tokenizer> load_tokenizer_json(const std::string& json_text, const std::string& where);
std::unique_ptr<Tokenizer> load_gguf_tokenizer(const GgufFile& file);
std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_bytes, const std::string& where);
bool sentencepiece_available();  // false when built without libsentencepiece
// Dispatches on source.kind ("bytes" needs no bytes).
std::unique_ptr<Tokenizer> load_tokenizer(const TokenizerSource& source, const std::string& where);

// ---- what the converter embeds ------------------------------------------------------------------

// From a Hugging Face model folder: tokenizer.json when qlora can load it, else tokenizer.model,
// else a tokenizer.json it cannot load (so that using it later names the reason), else none.
TokenizerSource tokenizer_from_hf_directory(const std::string& directory);
// From a GGUF model: a small GGUF image holding only its tokenizer.* keys (none when it has no
// tokenizer.ggml.model key).
TokenizerSource tokenizer_from_gguf(const GgufFile& file);

// The store's tokenizer: bytes for "bytes" stores, otherwise the embedded one. FormatError (naming
// the store, with a hint) when the store carries none.
TokenizerSource store_tokenizer_source(const ModelStore& store);
std::unique_ptr<Tokenizer> load_store_tokenizer(const ModelStore& store);

}  // namespace qlora::shard
