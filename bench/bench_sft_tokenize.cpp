// Instruction-data tokenization speed: a JSONL of conversations made from Jane Austen's paragraphs
// (user: "Continue the passage:\n\n" + paragraph i, assistant: paragraph i + 1), read, rendered with
// SmolLM2's chat template and tokenized with SmolLM2's tokenizer (both from its GGUF) under each
// --train-on mask, then written to and reused from the example cache. Prints examples/s and tokens/s
// and writes bench/results/sft_tokenize.json.
//
// Usage: bench_sft_tokenize --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--austen /work/shared/data/austen]
//        [--examples 4000] [--dir FOLDER]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "common/json.h"
#include "data/chat_template.h"
#include "data/example_cache.h"
#include "data/sft_dataset.h"
#include "data/sft_examples.h"
#include "data/tokenizer.h"
#include "shard/gguf.h"

#ifndef QLORA_RESULTS_DIR
#define QLORA_RESULTS_DIR "bench/results"
#endif

namespace {

using namespace qlora;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Paragraphs (blank-line separated, line breaks inside joined by spaces) of every novel, in order.
std::vector<std::string> paragraphs(const fs::path& folder) {
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(folder))
    if (entry.path().extension() == ".txt") files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  std::vector<std::string> found;
  for (const fs::path& file : files) {
    std::istringstream lines(read_text(file));
    std::string line, paragraph;
    while (std::getline(lines, line)) {
      if (!line.empty() && line.back() == '\r') line.pop_back();
      if (line.empty()) {
        if (paragraph.size() > 40) found.push_back(paragraph);
        paragraph.clear();
      } else {
        paragraph += (paragraph.empty() ? "" : " ") + line;
      }
    }
  }
  return found;
}

void write_conversations(const std::vector<std::string>& texts, int64_t count, const fs::path& path) {
  std::ofstream out(path, std::ios::binary);
  for (int64_t i = 0; i < count; ++i) {
    const std::string& prompt = texts[static_cast<size_t>(i) % texts.size()];
    const std::string& reply = texts[static_cast<size_t>(i + 1) % texts.size()];
    Json record = {{"messages", Json::array({Json{{"role", "user"}, {"content", "Continue the passage:\n\n" + prompt}},
                                             Json{{"role", "assistant"}, {"content", reply}}})}};
    out << dump_json(record) << "\n";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string gguf_path, austen = "/work/shared/data/austen", dir = (fs::temp_directory_path() / "qlora-bench-sft").string();
  int64_t count = 4000;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--gguf") gguf_path = argv[i + 1];
    else if (flag == "--austen") austen = argv[i + 1];
    else if (flag == "--examples") count = std::stoll(argv[i + 1]);
    else if (flag == "--dir") dir = argv[i + 1];
  }
  if (gguf_path.empty()) {
    std::fprintf(stderr, "usage: bench_sft_tokenize --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--examples N]\n");
    return 2;
  }
  fs::create_directories(dir);
  const fs::path data = fs::path(dir) / "austen_chats.jsonl";
  write_conversations(paragraphs(austen), count, data);
  fs::remove(data::example_cache_path(data.string()));

  const auto gguf = shard::GgufFile::open(gguf_path);
  const auto tokenizer = data::load_gguf_tokenizer(*gguf);
  const data::ChatTemplate chat_template(gguf->get_string("tokenizer.chat_template"), gguf_path);
  const Json variables = {{"bos_token", tokenizer->decode({tokenizer->bos_id()})},
                          {"eos_token", tokenizer->decode({tokenizer->eos_id()})}};
  const data::ConversationRenderer render = [&](const Json& messages, bool add_generation_prompt) {
    return chat_template.render(messages, add_generation_prompt, variables);
  };

  Json results = {{"data", data.string()}, {"examples", count}, {"bytes", fs::file_size(data)},
                  {"tokenizer", "SmolLM2-135M-Instruct (GGUF)"}, {"runs", Json::array()}};
  auto start = Clock::now();
  const data::SftDataset dataset = data::read_sft_dataset(data.string());
  const double read_seconds = seconds_since(start);
  std::printf("read %lld records (%.1f MB) in %.3f s\n", static_cast<long long>(dataset.records.size()),
              static_cast<double>(fs::file_size(data)) / 1e6, read_seconds);
  results["read_seconds"] = read_seconds;

  // Rendering alone, to split the time between the template and the tokenizer.
  start = Clock::now();
  size_t rendered_bytes = 0;
  for (const auto& record : dataset.records) rendered_bytes += render(record.messages, false).size();
  const double render_seconds = seconds_since(start);
  std::printf("render only: %.0f examples/s (%.1f MB rendered)\n", static_cast<double>(count) / render_seconds,
              static_cast<double>(rendered_bytes) / 1e6);
  results["render_examples_per_second"] = static_cast<double>(count) / render_seconds;

  for (const auto train_on : {data::TrainOn::all, data::TrainOn::assistant}) {
    start = Clock::now();
    const auto examples = data::tokenize_sft_dataset(dataset, *tokenizer, render, train_on);
    const double seconds = seconds_since(start);
    int64_t tokens = 0, counted = 0;
    for (const auto& example : examples) {
      tokens += static_cast<int64_t>(example.tokens.size());
      for (uint8_t bit : example.counted) counted += bit;
    }
    std::printf("train-on %-9s: %lld tokens (%lld counted) in %.3f s: %.0f examples/s, %.0f tokens/s\n",
                data::train_on_name(train_on).c_str(), static_cast<long long>(tokens), static_cast<long long>(counted),
                seconds, static_cast<double>(count) / seconds, static_cast<double>(tokens) / seconds);
    results["runs"].push_back({{"train_on", data::train_on_name(train_on)}, {"seconds", seconds}, {"tokens", tokens},
                               {"counted", counted}, {"examples_per_second", static_cast<double>(count) / seconds},
                               {"tokens_per_second", static_cast<double>(tokens) / seconds}});
  }

  data::ExampleRecipe recipe;
  recipe.tokenizer = tokenizer.get();
  recipe.tokenizer_checksum = "bench";
  recipe.template_source = chat_template.source();
  recipe.render = render;
  const auto built = data::ensure_example_cache(data.string(), recipe);
  const auto reused = data::ensure_example_cache(data.string(), recipe);
  start = Clock::now();
  const auto loaded = data::read_example_file(reused.path);
  const double load_seconds = seconds_since(start);
  std::printf("example cache: %s in %.3f s (read + tokenize + write), %s in %.3f s (key check), "
              "read back in %.3f s (%zu examples)\n", built.built ? "built" : "REUSED", built.seconds,
              reused.built ? "REBUILT" : "reused", reused.seconds, load_seconds, loaded.size());
  results["cache_build_seconds"] = built.seconds;
  results["cache_reuse_seconds"] = reused.seconds;
  results["cache_read_seconds"] = load_seconds;
  const std::string out = std::string(QLORA_RESULTS_DIR) + "/sft_tokenize.json";
  std::ofstream(out) << dump_json(results, 2) << "\n";
  std::printf("wrote %s\n", out.c_str());
  return 0;
}
