// A tokenizer as a model store carries it: the kind and the source bytes the converter found next to
// the weights (docs/FORMAT.md, /tokenizer). This stored form is a file-format concern; building a
// working tokenizer from it is data/tokenizer.h's.
#pragma once

#include <functional>
#include <string>

namespace qlora::shard {

class GgufFile;
class ModelStore;

// The kind and the source bytes (tokenizer.json text, a GGUF image holding the tokenizer.* metadata,
// or a SentencePiece model). Kinds: "bytes" (no bytes), "tokenizer.json", "gguf", "sentencepiece";
// empty kind: none.
struct TokenizerSource {
  std::string kind;
  std::string bytes;
  std::string bos_token;   // tokenizer.json only: tokenizer_config.json's names, "" when unknown
  std::string eos_token;
  // FNV-1a 64 over all of the above, hex: identifies the tokenizer for token caches.
  std::string checksum() const;
};

// Throws FormatError naming `where` when qlora cannot build a working tokenizer from `source`. The
// tokenizers sit above this layer (data::check_tokenizer is the one to pass), so the converter is
// handed the check rather than calling it.
using TokenizerCheck = std::function<void(const TokenizerSource& source, const std::string& where)>;

// From a Hugging Face model folder: tokenizer.json when `check` accepts it, else tokenizer.model
// (which `check` must accept, or the conversion fails), else a tokenizer.json `check` refused (so that
// using it later names the reason), else none. An empty `check` accepts every tokenizer.
TokenizerSource tokenizer_from_hf_directory(const std::string& directory, const TokenizerCheck& check);
// From a GGUF model: a small GGUF image holding only its tokenizer.* keys (none when it has no
// tokenizer.ggml.model key).
TokenizerSource tokenizer_from_gguf(const GgufFile& file);

// The model's Jinja chat template from a Hugging Face folder: tokenizer_config.json's chat_template
// (a string, or a list of {name, template} of which "default" is used), else the chat_template.jinja
// file newer transformers save beside it, else "" (the model has none). A chat_template of another
// shape, a list without "default", or an unreadable tokenizer_config.json that may hold one is a
// FormatError naming the file: a template is never dropped silently.
std::string chat_template_from_hf_directory(const std::string& directory);
// GGUF key tokenizer.chat_template, "" when absent (FormatError when it is not a string).
std::string chat_template_from_gguf(const GgufFile& file);

// The store's tokenizer source: kind "bytes" for "bytes" stores, otherwise the embedded one.
// FormatError (naming the store, with a hint) when the store carries none.
TokenizerSource store_tokenizer_source(const ModelStore& store);

}  // namespace qlora::shard
