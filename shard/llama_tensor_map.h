// How llama.cpp lays out a Llama model's tensors compared with Hugging Face: the name each tensor
// has on either side, and the row order of the Q and K projections. Both directions of both, so the
// GGUF import and an export back to GGUF share one table. Nothing here reads a file.
#pragma once

#include <cstdint>
#include <string>

namespace qlora::shard {

// token_embd.weight <-> model.embed_tokens.weight, blk.N.attn_q.weight <->
// model.layers.N.self_attn.q_proj.weight, ..., output.weight <-> lm_head.weight (weights and
// biases alike). Each is the other's inverse; both return "" for a name without a counterpart
// (rope_freqs.weight, say, or a layer number with a leading zero).
std::string llama_hf_tensor_name(const std::string& gguf_name);
std::string llama_gguf_tensor_name(const std::string& hf_name);

// llama.cpp's converter reorders the rows of each attention head of Q and K (LlamaModel.permute:
// reshape(n_head, 2, head_dim / 2, ...).swapaxes(1, 2)) so that rotary pairs sit next to each
// other; Hugging Face keeps the two halves apart: HF row h*hd + s*hd/2 + j is GGUF row
// h*hd + 2*j + s. Rows are moved whole (`row_bytes` each), so both work on raw F32/F16/BF16 and on
// block-quantized rows alike. `rows` must be a multiple of 2 * n_head (std::invalid_argument
// otherwise); source and destination must not overlap.
void unpermute_llama_rows(const uint8_t* gguf_rows, uint8_t* hf_rows, int64_t rows, uint64_t row_bytes,
                          int64_t n_head);
void permute_llama_rows(const uint8_t* hf_rows, uint8_t* gguf_rows, int64_t rows, uint64_t row_bytes,
                        int64_t n_head);

}  // namespace qlora::shard
