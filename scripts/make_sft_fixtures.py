#!/usr/bin/env python3
"""Makes tests/fixtures/sft/: small instruction datasets in every format qlora reads, and the token ids
and loss masks TRL's SFTTrainer preparation gives for them, which tests/data/test_sft_dataset.cpp
compares qlora's tokenization against id for id and mask bit for mask bit.

  text.jsonl, messages.jsonl, prompt_completion.jsonl, prompt_completion_chat.jsonl, sharegpt.jsonl,
  alpaca.json (a JSON array, pretty-printed)        the datasets
  chatml.jinja                                      a ChatML template (content trimmed) for austen_bpe.json
  austen_llama3_bos.json, llama3.jinja              austen_llama3.json with Llama 3's header and end-of-turn
                                                    tokens and a post-processor that prepends
                                                    <|begin_of_text|>; a Llama 3 style template
  expected.json                                     {"setups": {name: {tokenizer, template, eos_token}},
                                                     "cases": {setup: {file: [{"input_ids", "completion",
                                                     "assistant"}, ...]}}}

Setups: "austen_llama3" covers a tokenizer whose tokenizer(text) adds a bos (TRL's plain-text path) and
a template that writes bos_token itself; "austen_chatml" is tests/fixtures/tokenizers/austen_bpe.json (which has <|im_start|>, <|im_end|>
and <|endoftext|> as special tokens) with chatml.jinja, so CI checks the whole path; "smollm2" (with
--smollm2 PATH) is SmolLM2-135M-Instruct's tokenizer and chat template from its GGUF, in the form of the
hub's tokenizer.json (transformers' GGUF loader drops its Digits pre-tokenizer step).

The reference follows TRL's SFTTrainer._prepare_dataset (trl/trainer/sft_trainer.py, read at commit
f2cd577): ShareGPT turns become {"role", "content"} messages; non-conversational records get the eos
token appended unless they end with it; text is tokenized with tokenizer(text); prompt-completion
records tokenize the prompt and prompt + completion and mark the completion by the prompt's token count
(conversations: apply_chat_template with add_generation_prompt=True for the prompt); conversations are
tokenized by apply_chat_template(tokenize=True). Assistant masks come from transformers'
return_assistant_tokens_mask with a copy of each template whose assistant turns wrap
`content + end-of-turn token` in {% generation %} (as TRL's training templates do); the script checks that
copy renders exactly what the original does. Alpaca and ShareGPT roles are mapped as qlora's README
states (TRL itself keeps ShareGPT's role names). TRL is not installed here (it needs `datasets`); its
steps are the few transformers calls below.

Run with the fixture venv: /work/fixvenv/bin/python scripts/make_sft_fixtures.py [--smollm2 PATH]
"""
import argparse
import json
import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "sft")
TOKENIZERS = os.path.join(ROOT, "tests", "fixtures", "tokenizers")

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim"
          " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] | trim + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_GENERATION = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SMOLLM2_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


DATASETS = {
    "text.jsonl": [
        {"text": "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                 "must be in want of a wife."},
        {"text": "Mr. Bennet was so odd a mixture of quick parts, sarcastic humour, reserve, and caprice, that "
                 "the experience of three-and-twenty years had been insufficient to make his wife understand "
                 "his character."},
        {"text": "In 1811, \u00a310,000 a year<|im_end|>"},
        {"text": "Ends with the other end token<|endoftext|>"},
    ],
    "messages.jsonl": [
        {"messages": [user("Who is the heroine of Pride and Prejudice?"),
                      assistant("Elizabeth Bennet, the second of five daughters.")]},
        {"messages": [system("You answer in one word."), user("Say: Netherfield"), assistant("Netherfield"),
                      user("And the estate of Mr. Darcy?"), assistant("Pemberley")]},
        {"messages": [user("What did Darcy say of Elizabeth at the assembly?"),
                      assistant("  She is tolerable; but not handsome enough to tempt me. \n")]},
        {"messages": [user("Caf\u00e9 or th\u00e9? 42 cups!"), assistant("Th\u00e9, 1811 times \u2014 \u00e9videmment.")]},
    ],
    "prompt_completion.jsonl": [
        {"prompt": "The sky over Longbourn is", "completion": " grey with rain."},
        {"prompt": "Mrs. Bennet had five daughters:", "completion": " Jane, Elizabeth, Mary, Kitty and Lydia."},
        {"prompt": "In 1813 the novel", "completion": " was published<|endoftext|>"},
    ],
    "prompt_completion_chat.jsonl": [
        {"prompt": [user("Name the eldest Bennet sister.")], "completion": [assistant("Jane.")]},
        {"prompt": [system("Be brief."), user("Who wrote Emma?")], "completion": [assistant("Jane Austen, in 1815.")]},
        {"prompt": [user("Say: Rosings"), assistant("Rosings"), user("Whose house is it?")],
         "completion": [assistant("Lady Catherine de Bourgh's.")]},
    ],
    "sharegpt.jsonl": [
        {"conversations": [{"from": "human", "value": "Where does Mr. Bingley live?"},
                           {"from": "gpt", "value": "At Netherfield Park."}]},
        {"conversations": [{"from": "system", "value": "You are a literary guide."},
                           {"from": "human", "value": "Who marries Charlotte Lucas?"},
                           {"from": "gpt", "value": "Mr. Collins."},
                           {"from": "human", "value": "Why?"},
                           {"from": "gpt", "value": "For a comfortable home."}]},
    ],
    "alpaca.json": [
        {"instruction": "Summarise the first sentence of Pride and Prejudice.", "input": "",
         "output": "Rich single men are assumed to want wives."},
        {"instruction": "Translate into French.", "input": "A single man of good fortune.",
         "output": "Un homme seul \u00e0 la belle fortune."},
        {"instruction": "Count the Bennet daughters.", "output": "Five."},
    ],
}

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def write_datasets():
    for name, records in DATASETS.items():
        with open(os.path.join(OUT, name), "w", encoding="utf-8") as handle:
            if name.endswith(".json"):
                json.dump(records, handle, indent=2, ensure_ascii=False)
                handle.write("\n")
            else:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    with open(os.path.join(OUT, "chatml.jinja"), "w", encoding="utf-8") as handle:
        handle.write(CHATML)
    with open(os.path.join(OUT, "llama3.jinja"), "w", encoding="utf-8") as handle:
        handle.write(LLAMA3)


# The records as TRL sees them once converted: ("text", str) | ("messages", list) |
# ("prompt", prompt, completion) with strings or lists.
def converted(name, record):
    if name.startswith("text"):
        return {"text": record["text"]}
    if name.startswith("messages"):
        return {"messages": record["messages"]}
    if name.startswith("prompt_completion"):
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if name.startswith("sharegpt"):
        return {"messages": [{"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]}
                             for turn in record["conversations"]]}
    if name.startswith("alpaca"):
        instruction = record["instruction"]
        if record.get("input"):
            instruction += "\n\n" + record["input"]
        return {"prompt": [user(instruction)], "completion": [assistant(record["output"])]}
    raise ValueError(name)


def apply(tokenizer, messages, template, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True, **kwargs)


def reference_case(tokenizer, template, generation_template, example):
    eos = tokenizer.eos_token
    conversational = isinstance(example.get("messages", example.get("prompt")), list)
    case = {}
    if not conversational:
        # TRL's add_eos, then tokenizer(text) (with the tokenizer's own special-token rules).
        if "text" in example:
            text = example["text"] if example["text"].endswith(eos) else example["text"] + eos
            case["input_ids"] = tokenizer(text=text)["input_ids"]
            return case
        completion = example["completion"] if example["completion"].endswith(eos) else example["completion"] + eos
        prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
        ids = tokenizer(text=example["prompt"] + completion)["input_ids"]
        case["input_ids"] = ids
        case["completion"] = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
        return case
    messages = example["messages"] if "messages" in example else example["prompt"] + example["completion"]
    rendered = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    marked = tokenizer.apply_chat_template(messages, chat_template=generation_template, tokenize=False)
    assert rendered == marked, ("the generation-marked template renders differently", rendered, marked)
    whole = apply(tokenizer, messages, template)
    ids = list(whole["input_ids"])
    with_mask = apply(tokenizer, messages, generation_template, return_assistant_tokens_mask=True)
    assert list(with_mask["input_ids"]) == ids
    case["input_ids"] = ids
    case["assistant"] = list(with_mask["assistant_masks"])
    assert 1 in case["assistant"]
    if "prompt" in example:
        prompt_ids = list(apply(tokenizer, example["prompt"], template, add_generation_prompt=True)["input_ids"])
        assert ids[:len(prompt_ids)] == prompt_ids, "prompt tokens are not a prefix of the whole"
        case["completion"] = [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    return case


def reference_cases(tokenizer, template, generation_template):
    cases = {}
    for name, records in DATASETS.items():
        cases[name] = [reference_case(tokenizer, template, generation_template, converted(name, record))
                       for record in records]
    return cases


def austen_tokenizer():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=os.path.join(TOKENIZERS, "austen_bpe.json"),
                                   eos_token="<|endoftext|>")


def austen_llama3_tokenizer():
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer.from_file(os.path.join(TOKENIZERS, "austen_llama3.json"))
    tokenizer.add_special_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    path = os.path.join(OUT, "austen_llama3_bos.json")
    tokenizer.save(path, pretty=False)
    loaded = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    assert loaded("Hi")["input_ids"][0] == bos
    return loaded


def smollm2_tokenizer(gguf_path, folder):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    loaded = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    loaded.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer.json")
    spec = json.load(open(path, encoding="utf-8"))
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    Tokenizer.from_str(json.dumps(spec)).save(path)
    hub_style = PreTrainedTokenizerFast(tokenizer_file=path, bos_token=loaded.bos_token, eos_token=loaded.eos_token)
    return hub_style, loaded.chat_template


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", help="SmolLM2-135M-Instruct.Q4_1.gguf, for its reference ids and masks")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    write_datasets()
    import transformers
    expected = {"setups": {}, "cases": {}}
    tokenizer = austen_tokenizer()
    expected["setups"]["austen_chatml"] = {"tokenizer": "tokenizers/austen_bpe.json", "template": "sft/chatml.jinja",
                                           "eos_token": tokenizer.eos_token}
    expected["cases"]["austen_chatml"] = reference_cases(tokenizer, CHATML, CHATML_GENERATION)
    tokenizer = austen_llama3_tokenizer()
    expected["setups"]["austen_llama3"] = {"tokenizer": "sft/austen_llama3_bos.json", "template": "sft/llama3.jinja",
                                           "eos_token": tokenizer.eos_token}
    expected["cases"]["austen_llama3"] = reference_cases(tokenizer, LLAMA3, LLAMA3_GENERATION)
    if args.smollm2:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer, template = smollm2_tokenizer(args.smollm2, folder)
            expected["setups"]["smollm2"] = {"tokenizer": "$QLORA_SMOLLM2_GGUF", "template": "(in the GGUF)",
                                             "eos_token": tokenizer.eos_token}
            expected["cases"]["smollm2"] = reference_cases(tokenizer, template, SMOLLM2_GENERATION)
    with open(os.path.join(OUT, "expected.json"), "w", encoding="utf-8") as handle:
        json.dump(expected, handle, ensure_ascii=False)
        handle.write("\n")
    import jinja2
    import tokenizers
    with open(os.path.join(OUT, "VERSIONS"), "w", encoding="utf-8") as handle:
        handle.write(f"transformers {transformers.__version__}\ntokenizers {tokenizers.__version__}\n"
                     f"jinja2 {jinja2.__version__}\nTRL semantics read from huggingface/trl at f2cd577 "
                     "(trl/trainer/sft_trainer.py, trl/data_utils.py)\n")


if __name__ == "__main__":
    main()
