// SentencePiece models (.model protobufs, as Llama 2 and Mistral ship them) through Debian's
// libsentencepiece, reached via the qlora_sentencepiece module (see sentencepiece_module.cpp for
// why it is loaded apart). Without the module, loading a SentencePiece model names what is missing.
#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/errors.h"
#include "data/tokenizer.h"

namespace qlora::data {
namespace {

struct SentencePieceModule {
  void* (*load)(const char*, size_t, char*, size_t) = nullptr;
  void (*free)(void*) = nullptr;
  int (*encode)(const void*, const char*, size_t, std::vector<int>*) = nullptr;
  int (*decode)(const void*, const int*, size_t, std::string*) = nullptr;
  int (*number)(const void*, int) = nullptr;
  std::string problem;   // why it is unavailable
};

std::vector<std::string> module_candidates() {
  std::vector<std::string> candidates;
  if (const char* configured = std::getenv("QLORA_SENTENCEPIECE_MODULE")) candidates.push_back(configured);
  char executable[PATH_MAX];
  const ssize_t length = readlink("/proc/self/exe", executable, sizeof executable - 1);
  if (length > 0) {
    const std::filesystem::path folder = std::filesystem::path(std::string(executable, length)).parent_path();
    candidates.push_back((folder / "libqlora_sentencepiece.so").string());
    candidates.push_back((folder.parent_path() / "libqlora_sentencepiece.so").string());
  }
#ifdef QLORA_SENTENCEPIECE_MODULE_PATH
  candidates.push_back(QLORA_SENTENCEPIECE_MODULE_PATH);
#endif
  return candidates;
}

const SentencePieceModule& sentencepiece_module() {
  static const SentencePieceModule module = [] {
    SentencePieceModule loaded;
    void* handle = nullptr;
    for (const std::string& candidate : module_candidates()) {
      std::error_code error;
      if (!std::filesystem::exists(candidate, error)) continue;
      handle = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (handle != nullptr) break;
      loaded.problem = dlerror();
    }
    if (handle == nullptr) {
      if (loaded.problem.empty()) loaded.problem = "libqlora_sentencepiece.so not found";
      return loaded;
    }
    loaded.load = reinterpret_cast<decltype(loaded.load)>(dlsym(handle, "qlora_sentencepiece_load"));
    loaded.free = reinterpret_cast<decltype(loaded.free)>(dlsym(handle, "qlora_sentencepiece_free"));
    loaded.encode = reinterpret_cast<decltype(loaded.encode)>(dlsym(handle, "qlora_sentencepiece_encode"));
    loaded.decode = reinterpret_cast<decltype(loaded.decode)>(dlsym(handle, "qlora_sentencepiece_decode"));
    loaded.number = reinterpret_cast<decltype(loaded.number)>(dlsym(handle, "qlora_sentencepiece_number"));
    if (!loaded.load || !loaded.free || !loaded.encode || !loaded.decode || !loaded.number) {
      loaded.problem = "libqlora_sentencepiece.so lacks its entry points";
      loaded.load = nullptr;
    }
    return loaded;
  }();
  return module;
}

class SentencePieceTokenizer final : public Tokenizer {
 public:
  SentencePieceTokenizer(const SentencePieceModule& module, const std::string& model_bytes, const std::string& where)
      : module_(module) {
    char error[512] = "";
    processor_ = module_.load(model_bytes.data(), model_bytes.size(), error, sizeof error);
    if (processor_ == nullptr) throw FormatError(where + ": not a SentencePiece model: " + error);
  }
  ~SentencePieceTokenizer() override { module_.free(processor_); }

  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int> ids;
    // Encoding fails only for an unusable model, which loading has already refused.
    if (module_.encode(processor_, text.data(), text.size(), &ids) != 0)
      throw FormatError("SentencePiece could not encode a text of " + std::to_string(text.size()) + " bytes");
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> valid;
    for (int32_t id : ids)
      if (id >= 0 && id < vocab_size()) valid.push_back(id);
    std::string text;
    module_.decode(processor_, valid.data(), valid.size(), &text);
    return text;
  }
  int64_t vocab_size() const override { return module_.number(processor_, 0); }
  int32_t bos_id() const override { return module_.number(processor_, 1); }
  int32_t eos_id() const override { return module_.number(processor_, 2); }
  std::string kind() const override { return "sentencepiece"; }

 private:
  const SentencePieceModule& module_;
  void* processor_ = nullptr;
};

}  // namespace

bool sentencepiece_available() { return sentencepiece_module().load != nullptr; }

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_bytes, const std::string& where) {
  const SentencePieceModule& module = sentencepiece_module();
  if (module.load == nullptr)
    throw FormatError(where + ": a SentencePiece model, but qlora's SentencePiece module is unavailable (" +
                      module.problem + "); install libsentencepiece-dev and rebuild (scripts/setup)");
  return std::make_unique<SentencePieceTokenizer>(module, model_bytes, where);
}

}  // namespace qlora::data
