// The Llama name table and the Q/K row order, each written once and read in both directions.
#include "shard/llama_tensor_map.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace qlora::shard {
namespace {

struct NamePair {
  const char* gguf;
  const char* hf;
};
// Per-block modules, llama.cpp's name first (gguf-py tensor_mapping.py, MODEL_ARCH.LLAMA).
constexpr NamePair kBlockNames[] = {
    {"attn_q", "self_attn.q_proj"},     {"attn_k", "self_attn.k_proj"},  {"attn_v", "self_attn.v_proj"},
    {"attn_output", "self_attn.o_proj"}, {"ffn_gate", "mlp.gate_proj"},  {"ffn_up", "mlp.up_proj"},
    {"ffn_down", "mlp.down_proj"},       {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"},
};
constexpr NamePair kModelNames[] = {
    {"token_embd.weight", "model.embed_tokens.weight"},
    {"output_norm.weight", "model.norm.weight"},
    {"output.weight", "lm_head.weight"},
};

bool all_digits(const std::string& text) {
  return !text.empty() && text.size() < 10 && std::all_of(text.begin(), text.end(), [](char c) {
           return c >= '0' && c <= '9';
         }) && (text.size() == 1 || text[0] != '0');
}

// Splits "<prefix><layer>.<module>.<suffix>" with suffix weight or bias.
bool split_block_name(const std::string& name, const std::string& prefix, std::string* layer, std::string* module,
                      std::string* suffix) {
  if (name.rfind(prefix, 0) != 0) return false;
  const size_t layer_end = name.find('.', prefix.size());
  if (layer_end == std::string::npos) return false;
  *layer = name.substr(prefix.size(), layer_end - prefix.size());
  const size_t suffix_start = name.rfind('.');
  if (suffix_start <= layer_end) return false;
  *module = name.substr(layer_end + 1, suffix_start - layer_end - 1);
  *suffix = name.substr(suffix_start + 1);
  return all_digits(*layer) && (*suffix == "weight" || *suffix == "bias");
}

// Calls move(hf_row, gguf_row) for every row of every head; the two directions differ only in
// which side is the source.
template <typename MoveRow>
void for_each_llama_row(const char* caller, int64_t rows, int64_t n_head, MoveRow move) {
  if (n_head <= 0 || rows < 0 || rows % (2 * n_head) != 0)
    throw std::invalid_argument(std::string(caller) + ": " + std::to_string(rows) + " rows do not split into " +
                                std::to_string(n_head) + " heads of an even size");
  const int64_t head_dim = rows / n_head;
  const int64_t half = head_dim / 2;
  for (int64_t head = 0; head < n_head; ++head) {
    for (int64_t s = 0; s < 2; ++s) {
      for (int64_t j = 0; j < half; ++j) move(head * head_dim + s * half + j, head * head_dim + 2 * j + s);
    }
  }
}

}  // namespace

std::string llama_hf_tensor_name(const std::string& gguf_name) {
  for (const NamePair& pair : kModelNames) {
    if (gguf_name == pair.gguf) return pair.hf;
  }
  std::string layer, module, suffix;
  if (!split_block_name(gguf_name, "blk.", &layer, &module, &suffix)) return "";
  for (const NamePair& pair : kBlockNames) {
    if (module == pair.gguf) return "model.layers." + layer + "." + pair.hf + "." + suffix;
  }
  return "";
}

std::string llama_gguf_tensor_name(const std::string& hf_name) {
  for (const NamePair& pair : kModelNames) {
    if (hf_name == pair.hf) return pair.gguf;
  }
  std::string layer, module, suffix;
  if (!split_block_name(hf_name, "model.layers.", &layer, &module, &suffix)) return "";
  for (const NamePair& pair : kBlockNames) {
    if (module == pair.hf) return "blk." + layer + "." + pair.gguf + "." + suffix;
  }
  return "";
}

void unpermute_llama_rows(const uint8_t* gguf_rows, uint8_t* hf_rows, int64_t rows, uint64_t row_bytes,
                          int64_t n_head) {
  for_each_llama_row("unpermute_llama_rows", rows, n_head, [&](int64_t hf_row, int64_t gguf_row) {
    std::memcpy(hf_rows + hf_row * row_bytes, gguf_rows + gguf_row * row_bytes, row_bytes);
  });
}

void permute_llama_rows(const uint8_t* hf_rows, uint8_t* gguf_rows, int64_t rows, uint64_t row_bytes,
                        int64_t n_head) {
  for_each_llama_row("permute_llama_rows", rows, n_head, [&](int64_t hf_row, int64_t gguf_row) {
    std::memcpy(gguf_rows + gguf_row * row_bytes, hf_rows + hf_row * row_bytes, row_bytes);
  });
}

}  // namespace qlora::shard
