// A separately loaded module around libsentencepiece. Debian's libsentencepiece carries its own copy
// of protobuf-lite and exports it; linked into the same process as LibTorch's libprotobuf, the two
// resolve each other's symbols and the process crashes before main. qlora therefore dlopen()s this
// module with RTLD_LOCAL | RTLD_DEEPBIND (data/sentencepiece_tokenizer.cpp), which keeps each
// copy to itself, and talks to it through these few C entry points.
#include <sentencepiece_processor.h>

#include <cstring>
#include <string>
#include <vector>

namespace {

void copy_message(const std::string& message, char* error, size_t error_size) {
  if (error_size == 0) return;
  std::strncpy(error, message.c_str(), error_size - 1);
  error[error_size - 1] = '\0';
}

}  // namespace

extern "C" {

void* qlora_sentencepiece_load(const char* model, size_t size, char* error, size_t error_size) {
  auto* processor = new sentencepiece::SentencePieceProcessor();
  const auto status = processor->LoadFromSerializedProto(std::string(model, size));
  if (!status.ok()) {
    copy_message(status.ToString(), error, error_size);
    delete processor;
    return nullptr;
  }
  return processor;
}

void qlora_sentencepiece_free(void* processor) { delete static_cast<sentencepiece::SentencePieceProcessor*>(processor); }

int qlora_sentencepiece_encode(const void* processor, const char* text, size_t size, std::vector<int>* ids) {
  return static_cast<const sentencepiece::SentencePieceProcessor*>(processor)
             ->Encode(std::string(text, size), ids)
             .ok()
             ? 0
             : -1;
}

int qlora_sentencepiece_decode(const void* processor, const int* ids, size_t count, std::string* text) {
  const std::vector<int> pieces(ids, ids + count);
  return static_cast<const sentencepiece::SentencePieceProcessor*>(processor)->Decode(pieces, text).ok() ? 0 : -1;
}

// Which: 0 piece count, 1 bos id, 2 eos id.
int qlora_sentencepiece_number(const void* processor, int which) {
  const auto* typed = static_cast<const sentencepiece::SentencePieceProcessor*>(processor);
  return which == 0 ? typed->GetPieceSize() : which == 1 ? typed->bos_id() : typed->eos_id();
}

}  // extern "C"
