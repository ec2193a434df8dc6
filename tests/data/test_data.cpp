// Training data: token caches (built once, reused, rebuilt when the text or the tokenizer changes),
// token files, the seeded window order, and ranks that read only their own rows.
#include <gtest/gtest.h>
#include <mpi.h>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/batch_sampler.h"
#include "data/token_cache.h"
#include "data/token_stream.h"
#include "data/tokenizer.h"
#include "support/test_support.h"

namespace qlora::data {
namespace {

namespace fs = std::filesystem;
using testing_support::read_file;
using testing_support::source_dir;
using testing_support::write_file;

std::unique_ptr<Tokenizer> fixture_tokenizer(shard::TokenizerSource* source) {
  source->kind = "tokenizer.json";
  source->bytes = read_file(source_dir() + "/tests/fixtures/tokenizers/austen_bpe.json");
  return load_tokenizer(*source, "austen_bpe.json");
}

std::vector<int64_t> all_tokens(const TokenStream& stream) {
  std::vector<int64_t> tokens(static_cast<size_t>(stream.size()));
  stream.read(0, stream.size(), tokens.data());
  return tokens;
}

std::vector<int64_t> widen(const std::vector<int32_t>& ids) { return std::vector<int64_t>(ids.begin(), ids.end()); }

TEST(TokenCache, BuiltOnceReusedAndRebuiltWhenTheTextOrTheTokenizerChanges) {
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "cache";
  fs::create_directories(folder);
  const fs::path corpus = folder / "corpus.txt";
  const std::string text = read_file(source_dir() + "/launcher/demo/austen_excerpt.txt");
  write_file(corpus, text);
  shard::TokenizerSource source;
  const auto tokenizer = fixture_tokenizer(&source);

  const TokenCacheResult built = ensure_token_cache(corpus.string(), *tokenizer, source.checksum());
  EXPECT_TRUE(built.built);
  EXPECT_EQ(built.path, corpus.string() + ".tokens.h5");
  std::vector<int64_t> want = widen(tokenizer->encode(text));
  want.push_back(tokenizer->eos_id());   // each document ends with end-of-text
  EXPECT_EQ(all_tokens(*TokenStream::open_file(built.path)), want);
  EXPECT_EQ(built.tokens, static_cast<int64_t>(want.size()));

  const auto modified = fs::last_write_time(built.path);
  const TokenCacheResult reused = ensure_token_cache(corpus.string(), *tokenizer, source.checksum());
  EXPECT_FALSE(reused.built);
  EXPECT_EQ(reused.path, built.path);
  EXPECT_EQ(fs::last_write_time(built.path), modified) << "a current cache is not rewritten";
  std::printf("token cache of %zu bytes: built in %.3f s, reused in %.4f s\n", text.size(), built.seconds,
              reused.seconds);

  // One changed character in the text: rebuilt, with the new tokens.
  std::string edited = text;
  edited[edited.size() / 2] = edited[edited.size() / 2] == 'x' ? 'y' : 'x';
  write_file(corpus, edited);
  const TokenCacheResult after_edit = ensure_token_cache(corpus.string(), *tokenizer, source.checksum());
  EXPECT_TRUE(after_edit.built);
  want = widen(tokenizer->encode(edited));
  want.push_back(tokenizer->eos_id());
  EXPECT_EQ(all_tokens(*TokenStream::open_file(after_edit.path)), want);

  // Another tokenizer (byte tokens): rebuilt, no end-of-text token.
  const auto bytes = make_byte_tokenizer();
  const TokenCacheResult retokenized = ensure_token_cache(corpus.string(), *bytes, shard::TokenizerSource{"bytes", "", "", ""}.checksum());
  EXPECT_TRUE(retokenized.built);
  EXPECT_EQ(all_tokens(*TokenStream::open_file(retokenized.path)), byte_tokens(edited));
}

TEST(TokenCache, AReadOnlyFolderSendsTheCacheToTheCacheFolder) {
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "readonly";
  fs::create_directories(folder / "texts");
  write_file(folder / "texts" / "a.txt", "Emma Woodhouse, handsome, clever, and rich.\n");
  fs::permissions(folder, fs::perms::owner_read | fs::perms::owner_exec | fs::perms::group_read |
                              fs::perms::group_exec | fs::perms::others_read | fs::perms::others_exec);
  setenv("QLORA_CACHE_DIR", (fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "cache-dir").c_str(), 1);
  const auto bytes = make_byte_tokenizer();
  const std::string checksum = shard::TokenizerSource{"bytes", "", "", ""}.checksum();
  const TokenCacheResult built = ensure_token_cache((folder / "texts").string(), *bytes, checksum);
  const TokenCacheResult reused = ensure_token_cache((folder / "texts").string(), *bytes, checksum);
  const std::string fallback = fallback_token_cache_path((folder / "texts").string());
  unsetenv("QLORA_CACHE_DIR");
  fs::permissions(folder, fs::perms::owner_all);
  EXPECT_TRUE(built.built);
  EXPECT_FALSE(reused.built);
  EXPECT_EQ(built.path, fallback);
  EXPECT_EQ(built.path.rfind(fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "cache-dir", 0), 0u) << built.path;
  EXPECT_FALSE(fs::exists(folder / "texts.tokens.h5"));
  EXPECT_EQ(reused.path, built.path);
}

TEST(TokenCache, FolderSourcesAreSortedDocumentsAndLargeFilesTokenizeAsAWhole) {
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "corpus";
  fs::create_directories(folder / "sub");
  shard::TokenizerSource source;
  const auto tokenizer = fixture_tokenizer(&source);
  write_file(folder / "b.txt", "Second document, 42 pages.\n");
  write_file(folder / "sub" / "c.md", "Third: \xC3\xA9t\xC3\xA9 \xF0\x9F\x8E\x89\n");
  write_file(folder / "a.txt", "First document.\n");
  write_file(folder / "ignored.csv", "not text");
  const TokenCacheResult cache = ensure_token_cache(folder.string() + "/", *tokenizer, source.checksum());
  EXPECT_EQ(cache.path, folder.string() + ".tokens.h5");
  std::vector<int64_t> want;
  for (const char* name : {"a.txt", "b.txt", "sub/c.md"}) {
    const auto ids = widen(tokenizer->encode(read_file(folder / name)));
    want.insert(want.end(), ids.begin(), ids.end());
    want.push_back(tokenizer->eos_id());
  }
  EXPECT_EQ(all_tokens(*TokenStream::open_file(cache.path)), want);

  // Austen's novels (when present) are tokenized in 4 MiB pieces; the ids equal one whole encode.
  const fs::path emma = "/work/shared/data/austen/emma.txt";
  if (!fs::exists(emma)) return;
  const fs::path big = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "emma_five_times.txt";
  const std::string text = read_file(emma) + read_file(emma) + read_file(emma) + read_file(emma) + read_file(emma);
  write_file(big, text);
  const TokenCacheResult large = ensure_token_cache(big.string(), *tokenizer, source.checksum());
  std::vector<int64_t> whole = widen(tokenizer->encode(text));
  whole.push_back(tokenizer->eos_id());
  EXPECT_EQ(all_tokens(*TokenStream::open_file(large.path)), whole);
  const TokenCacheResult again = ensure_token_cache(big.string(), *tokenizer, source.checksum());
  std::printf("token cache of %.1f MB (austen_bpe tokenizer): built in %.2f s (%.1f MB/s), reused in %.3f s\n",
              text.size() / 1e6, large.seconds, text.size() / 1e6 / large.seconds, again.seconds);
  EXPECT_FALSE(again.built);
}

TEST(TokenCache, ThreadsEncodeSmallPiecesToTheIdsOfOneWholeEncode) {
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "threaded";
  fs::create_directories(folder);
  shard::TokenizerSource source;
  const auto tokenizer = fixture_tokenizer(&source);
  std::string text;
  for (int line = 0; line < 3000; ++line)
    text += "Line " + std::to_string(line) + (line % 7 == 0 ? ": \xC3\xA9t\xC3\xA9 \xF0\x9F\x8E\x89" : " of it") +
            (line % 5 == 0 ? "\n\n" : "\n") + (line % 11 == 0 ? "  indented " : "");
  std::vector<int64_t> whole = widen(tokenizer->encode(text));
  whole.push_back(tokenizer->eos_id());
  for (const int threads : {1, 3}) {
    const fs::path corpus = folder / ("corpus" + std::to_string(threads) + ".txt");
    write_file(corpus, text);
    TokenizeSettings settings;
    settings.threads = threads;
    settings.piece_bytes = 4096;   // ~15 pieces, several rounds of three
    const TokenCacheResult cache = ensure_token_cache(corpus.string(), *tokenizer, source.checksum(), settings);
    EXPECT_EQ(all_tokens(*TokenStream::open_file(cache.path)), whole) << threads << " threads";
  }
}

TEST(TokenCache, TemporariesOfKilledRunsAreRemovedThoseOfLiveOnesKept) {
  const fs::path folder = fs::path(testing_support::shared_temp_dir(MPI_COMM_SELF)) / "partials";
  fs::create_directories(folder);
  const fs::path corpus = folder / "corpus.txt";
  write_file(corpus, "A few words.\n");
  char host[256] = {};
  ASSERT_EQ(gethostname(host, sizeof host - 1), 0);
  const pid_t child = fork();
  if (child == 0) _exit(0);
  ASSERT_GT(child, 0);
  waitpid(child, nullptr, 0);   // a process id that no longer exists, like a killed run's
  const std::string prefix = token_cache_path(corpus.string()) + ".partial-" + host + "-";
  const fs::path abandoned = prefix + std::to_string(child);
  const fs::path live = prefix + std::to_string(getppid());   // alive: the process that started this test
  const fs::path other_host = token_cache_path(corpus.string()) + ".partial-elsewhere-" + std::to_string(child);
  for (const auto& path : {abandoned, live, other_host}) write_file(path, "half a token file");
  const auto bytes = make_byte_tokenizer();
  ensure_token_cache(corpus.string(), *bytes, "bytes");
  EXPECT_FALSE(fs::exists(abandoned));
  EXPECT_TRUE(fs::exists(live));
  EXPECT_TRUE(fs::exists(other_host));   // another host's process cannot be checked from here
}

TEST(Sampler, EveryEpochVisitsEveryWindowOnceInASeededOrder) {
  for (uint64_t count : {1ull, 2ull, 7ull, 64ull, 1000ull}) {
    std::vector<int> seen(count, 0);
    for (uint64_t i = 0; i < count; ++i) ++seen[permuted_index(i, count, 99)];
    for (uint64_t i = 0; i < count; ++i) ASSERT_EQ(seen[i], 1) << "count " << count << ", window " << i;
  }
  int moved = 0, differs = 0;
  for (uint64_t i = 0; i < 1000; ++i) {
    moved += permuted_index(i, 1000, 99) != i;
    differs += permuted_index(i, 1000, 99) != permuted_index(i, 1000, 100);
  }
  EXPECT_GT(moved, 900) << "the order is shuffled";
  EXPECT_GT(differs, 900) << "another seed gives another order";

  // Packing: windows of seq-len + 1 tokens, neighbours sharing one token; one epoch covers them all.
  std::vector<int64_t> tokens(101);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int64_t>(i);
  BatchSampler sampler(tokens, 10, 5, 7);
  ASSERT_EQ(sampler.window_count(), 10);
  std::vector<int> starts(10, 0);
  for (int64_t step = 0; step < 2; ++step) {
    const auto [inputs, targets] = sampler.batch(step, 0, 1);
    for (int64_t row = 0; row < 5; ++row) {
      const int64_t first = inputs[row][0].item<int64_t>();
      ASSERT_EQ(first % 10, 0);
      ++starts[static_cast<size_t>(first / 10)];
      EXPECT_TRUE(torch::equal(targets[row], inputs[row] + 1));
    }
  }
  for (int count : starts) EXPECT_EQ(count, 1);
}

TEST(Sampler, EachRankReadsOnlyItsRowsOfTheGlobalBatchFromTheTokenFile) {
  const std::string path = testing_support::shared_temp_dir(MPI_COMM_SELF) + "/pretokenized.h5";
  std::vector<int32_t> tokens(20000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7919) % 50000);
  write_token_file(path, tokens, "none", "test", "none");
  const int64_t sequence = 32, global = 12, steps = 5;
  const auto whole = TokenStream::open_file(path);
  EXPECT_EQ(whole->size(), 20000);
  EXPECT_EQ(whole->max_token(), *std::max_element(tokens.begin(), tokens.end()));
  BatchSampler one_rank(whole, 0, whole->size(), sequence, global, 3);
  for (int world : {2, 3, 4}) {
    std::vector<std::shared_ptr<TokenStream>> streams;
    for (int rank = 0; rank < world; ++rank) streams.push_back(TokenStream::open_file(path));
    for (int64_t step = 0; step < steps; ++step) {
      std::vector<torch::Tensor> inputs, targets;
      for (int rank = 0; rank < world; ++rank) {
        BatchSampler sampler(streams[rank], 0, streams[rank]->size(), sequence, global, 3);
        auto [rank_inputs, rank_targets] = sampler.batch(step, rank, world);
        inputs.push_back(rank_inputs);
        targets.push_back(rank_targets);
      }
      const auto [all_inputs, all_targets] = one_rank.batch(step, 0, 1);
      EXPECT_TRUE(torch::equal(torch::cat(inputs), all_inputs)) << "world " << world << " step " << step;
      EXPECT_TRUE(torch::equal(torch::cat(targets), all_targets)) << "world " << world << " step " << step;
    }
    for (int rank = 0; rank < world; ++rank)
      EXPECT_EQ(streams[rank]->tokens_read(), static_cast<uint64_t>(steps * global / world * (sequence + 1)))
          << "rank " << rank << " of " << world << " reads its " << global / world << " rows per step, no more";
  }
  EXPECT_EQ(whole->tokens_read(), static_cast<uint64_t>(steps * 3 * global * (sequence + 1)));
}

}  // namespace
}  // namespace qlora::data
