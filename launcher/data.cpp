// Text loading and the deterministic window sampler.
#include "launcher/data.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "launcher/errors.h"

namespace qlora::launcher {
namespace {

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot read data file " + path.string(), "check the path and its permissions");
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

uint64_t splitmix64(uint64_t value) {
  value += 0x9e3779b97f4a7c15ull;
  value = (value ^ (value >> 30)) * 0xbf58476d1ce4e5b9ull;
  value = (value ^ (value >> 27)) * 0x94d049bb133111ebull;
  return value ^ (value >> 31);
}

}  // namespace

std::string read_text_source(const std::string& path) {
  std::error_code error;
  const std::filesystem::path source(path);
  if (std::filesystem::is_regular_file(source, error)) {
    std::string text = read_file(source);
    if (text.empty()) throw UserError("data file " + path + " is empty", "point --data at a text file or folder");
    return text;
  }
  if (!std::filesystem::is_directory(source, error))
    throw UserError("no such data file or folder: " + path, "point --data at a text file or a folder of .txt files");
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(source, error)) {
    const auto extension = entry.path().extension().string();
    if (entry.is_regular_file() && (extension == ".txt" || extension == ".md")) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  std::string text;
  for (const auto& file : files) text += read_file(file);
  if (text.empty())
    throw UserError("data folder " + path + " holds no non-empty .txt or .md file", "add text files to it");
  return text;
}

std::vector<int64_t> byte_tokens(const std::string& text) {
  std::vector<int64_t> tokens(text.size());
  for (size_t i = 0; i < text.size(); ++i) tokens[i] = static_cast<unsigned char>(text[i]);
  return tokens;
}

BatchSampler::BatchSampler(std::vector<int64_t> tokens, int64_t sequence_length, int64_t global_batch, uint64_t seed)
    : tokens_(std::move(tokens)), sequence_length_(sequence_length), global_batch_(global_batch), seed_(seed) {}

std::pair<torch::Tensor, torch::Tensor> BatchSampler::batch(int64_t step, int rank, int world) const {
  const int64_t rows = global_batch_ / world;
  const int64_t first_row = rows * rank;
  const int64_t window_starts = token_count() - sequence_length_;  // need sequence_length + 1 tokens
  auto inputs = torch::empty({rows, sequence_length_}, torch::kLong);
  auto targets = torch::empty({rows, sequence_length_}, torch::kLong);
  auto* input_data = inputs.data_ptr<int64_t>();
  auto* target_data = targets.data_ptr<int64_t>();
  for (int64_t row = 0; row < rows; ++row) {
    const uint64_t draw = splitmix64(seed_ ^ splitmix64(static_cast<uint64_t>(step) * 1000003ull +
                                                          static_cast<uint64_t>(first_row + row)));
    const int64_t start = static_cast<int64_t>(draw % static_cast<uint64_t>(window_starts));
    std::copy(tokens_.begin() + start, tokens_.begin() + start + sequence_length_, input_data + row * sequence_length_);
    std::copy(tokens_.begin() + start + 1, tokens_.begin() + start + 1 + sequence_length_,
              target_data + row * sequence_length_);
  }
  return {inputs, targets};
}

int64_t BatchSampler::window_count() const { return std::max<int64_t>(0, (token_count() - 1) / sequence_length_); }

std::pair<torch::Tensor, torch::Tensor> BatchSampler::sequential(int64_t count, int rank, int world) const {
  const int64_t rows = count / world;
  const int64_t first_window = rows * rank;
  auto inputs = torch::empty({rows, sequence_length_}, torch::kLong);
  auto targets = torch::empty({rows, sequence_length_}, torch::kLong);
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t start = (first_window + row) * sequence_length_;
    std::copy(tokens_.begin() + start, tokens_.begin() + start + sequence_length_,
              inputs.data_ptr<int64_t>() + row * sequence_length_);
    std::copy(tokens_.begin() + start + 1, tokens_.begin() + start + 1 + sequence_length_,
              targets.data_ptr<int64_t>() + row * sequence_length_);
  }
  return {inputs, targets};
}

}  // namespace qlora::launcher
