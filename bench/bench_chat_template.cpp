// Chat template render speed: each verified template (tests/fixtures/chat_templates) renders a
// 10-turn conversation (system prompt + 10 user/assistant exchanges, mixed-script text) with the
// generation prompt; prints microseconds per render (median of 5 runs of 2000 renders) and parse
// time, and writes bench/results/chat_template.json. Rendering runs once per example when a chat
// dataset is tokenized, so this bounds the templating share of data preparation.
// Usage: bench_chat_template
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/json.h"
#include "data/chat_template.h"

namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

double microseconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main() {
  using qlora::Json;
  const std::string folder = std::string(QLORA_RESULTS_DIR) + "/../../tests/fixtures/chat_templates/";
  const std::vector<std::string> templates = {
      "llama-3.2-instruct.jinja", "llama-2-chat.jinja", "mistral-7b-instruct-v0.2.jinja",
      "mistral-nemo-instruct-2407.jinja", "qwen2.5-instruct.jinja", "qwen3-0.6b.jinja", "smollm2-135m-instruct.jinja",
      "gemma-2-2b-it.jinja", "phi-3.5-mini-instruct.jinja"};
  Json messages = Json::array();
  messages.push_back({{"role", "system"}, {"content", "You are a helpful assistant. Réponds brièvement."}});
  for (int turn = 0; turn < 10; ++turn) {
    messages.push_back({{"role", "user"}, {"content", "Question " + std::to_string(turn) +
                                                          ": how do adapters work with 4-bit weights? 你好 😀"}});
    messages.push_back({{"role", "assistant"}, {"content", "  Answer " + std::to_string(turn) +
                                                               ": LoRA adds a low-rank update; the base stays frozen.  "}});
  }
  messages.push_back({{"role", "user"}, {"content", "Thanks!"}});
  const Json variables = {{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"date_string", "26 Jul 2024"}};
  Json rows = Json::array();
  std::printf("%-34s %10s %12s %10s\n", "template", "parse us", "render us", "bytes");
  for (const auto& name : templates) {
    const std::string source = read_text(folder + name);
    auto parse_start = std::chrono::steady_clock::now();
    const int parses = 200;
    for (int i = 0; i < parses; ++i) qlora::data::ChatTemplate(source, name);
    const double parse_us = microseconds_since(parse_start) / parses;
    const qlora::data::ChatTemplate chat_template(source, name);
    // Gemma and Mistral v0.2 reject a system message: they get the conversation without one.
    Json conversation = messages;
    try {
      chat_template.render(conversation, true, variables);
    } catch (const qlora::data::ChatTemplateError&) {
      conversation.erase(conversation.begin());
    }
    std::string rendered;
    std::vector<double> runs;
    const int renders = 2000;
    for (int run = 0; run < 5; ++run) {
      auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < renders; ++i) rendered = chat_template.render(conversation, true, variables);
      runs.push_back(microseconds_since(start) / renders);
    }
    std::sort(runs.begin(), runs.end());
    std::printf("%-34s %10.1f %12.1f %10zu\n", name.c_str(), parse_us, runs[2], rendered.size());
    rows.push_back({{"template", name}, {"parse_us", parse_us}, {"render_us_median", runs[2]},
                    {"render_us_min", runs[0]}, {"rendered_bytes", rendered.size()},
                    {"messages", conversation.size()}});
  }
  Json result;
  result["benchmark"] = "chat_template";
  result["conversation"] = "system prompt (not for Gemma and Mistral v0.2, which refuse one) + 10 user/assistant exchanges + a final user turn, "
                           "add_generation_prompt";
  result["rows"] = rows;
  const std::string path = std::string(QLORA_RESULTS_DIR) + "/chat_template.json";
  std::ofstream(path) << qlora::dump_json(result, 2) << "\n";
  std::printf("wrote %s\n", path.c_str());
  return 0;
}
