// Tokenizing a large first-time corpus into its token cache (what rank 0 does before the first step
// of a run on new data): MB/s and tokens/s with one thread and with every core, for a corpus of
// --megabytes (default 1024) made by repeating Jane Austen's novels, with the SmolLM2 tokenizer
// (49152 ids, from QLORA_SMOLLM2_GGUF) when available, else the 1024-id fixture BPE. Prints the
// figures and writes bench/results/tokenize.json.
//
// Usage: bench_tokenize [--megabytes N] [--austen FOLDER] [--dir SCRATCH]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/json.h"
#include "data/token_cache.h"
#include "data/tokenizer.h"
#include "shard/gguf.h"
#include "shard/tokenizer_source.h"

#ifndef QLORA_RESULTS_DIR
#define QLORA_RESULTS_DIR "bench/results"
#endif

namespace {

namespace fs = std::filesystem;
using namespace qlora;

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Writes about `megabytes` MB of the novels in turn (each a whole number of times) to `path`.
void write_corpus(const fs::path& austen, int64_t megabytes, const fs::path& path) {
  std::vector<std::string> novels;
  for (const auto& entry : fs::directory_iterator(austen))
    if (entry.path().extension() == ".txt") novels.push_back(read_text(entry.path()));
  if (novels.empty()) {
    std::fprintf(stderr, "no .txt files under %s\n", austen.c_str());
    std::exit(2);
  }
  std::ofstream out(path, std::ios::binary);
  const int64_t target = megabytes * 1000 * 1000;
  for (int64_t written = 0, next = 0; written < target; ++next) {
    const std::string& novel = novels[static_cast<size_t>(next) % novels.size()];
    out << novel;
    written += static_cast<int64_t>(novel.size());
  }
}

struct Tokenizer {
  std::unique_ptr<data::Tokenizer> tokenizer;
  std::string name;
};

Tokenizer bench_tokenizer(const fs::path& source_dir) {
  if (const char* gguf = std::getenv("QLORA_SMOLLM2_GGUF"); gguf != nullptr && fs::exists(gguf))
    return {data::load_gguf_tokenizer(*shard::GgufFile::open(gguf)), "SmolLM2-135M (GGUF, 49152 ids)"};
  shard::TokenizerSource source{"tokenizer.json", read_text(source_dir / "tests/fixtures/tokenizers/austen_bpe.json"), "", ""};
  return {data::load_tokenizer(source, "austen_bpe.json"), "austen_bpe fixture (1024 ids)"};
}

}  // namespace

int main(int argc, char** argv) {
  const fs::path source_dir = fs::path(__FILE__).parent_path().parent_path();
  int64_t megabytes = 1024;
  fs::path austen = source_dir.parent_path() / "shared/data/austen";
  fs::path scratch = fs::temp_directory_path() / "qlora-bench-tokenize";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--megabytes")) megabytes = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--austen")) austen = argv[i + 1];
    else if (!std::strcmp(argv[i], "--dir")) scratch = argv[i + 1];
  }
  fs::create_directories(scratch);
  const fs::path corpus = scratch / ("austen-" + std::to_string(megabytes) + "MB.txt");
  if (!fs::exists(corpus)) write_corpus(austen, megabytes, corpus);
  const double bytes = static_cast<double>(fs::file_size(corpus));
  const Tokenizer bench = bench_tokenizer(source_dir);
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));

  Json runs = Json::array();
  for (const int threads : {1, cores}) {
    fs::remove(data::token_cache_path(corpus.string()));
    data::TokenizeSettings settings;
    settings.threads = threads;
    const auto result = data::ensure_token_cache(corpus.string(), *bench.tokenizer, "bench", settings);
    const double megabytes_per_second = bytes / 1e6 / result.seconds;
    const double tokens_per_second = static_cast<double>(result.tokens) / result.seconds;
    std::printf("%.0f MB corpus, %s, %d thread(s): %.1f s, %.1f MB/s, %.2f M tokens/s (%lld tokens)\n", bytes / 1e6,
                bench.name.c_str(), threads, result.seconds, megabytes_per_second, tokens_per_second / 1e6,
                static_cast<long long>(result.tokens));
    Json run;
    run["threads"] = threads;
    run["seconds"] = result.seconds;
    run["megabytes_per_second"] = megabytes_per_second;
    run["tokens_per_second"] = tokens_per_second;
    run["tokens"] = result.tokens;
    runs.push_back(run);
  }
  fs::remove(data::token_cache_path(corpus.string()));
  Json root;
  root["corpus_bytes"] = bytes;
  root["tokenizer"] = bench.name;
  root["cores"] = cores;
  root["runs"] = runs;
  root["command"] = "QLORA_SMOLLM2_GGUF=... build/bench/bench_tokenize --megabytes " + std::to_string(megabytes);
  std::ofstream(std::string(QLORA_RESULTS_DIR) + "/tokenize.json") << dump_json(root, 2) << "\n";
  return 0;
}
