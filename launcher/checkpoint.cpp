// Checkpoint writing, discovery, pruning and collective loading.
#include "launcher/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include "common/json.h"
#include "common/log.h"
#include "launcher/adapter_io.h"
#include "launcher/errors.h"
#include "shard/hdf5_file.h"
#include "shard/safetensors.h"

namespace qlora::launcher {
namespace {

constexpr const char* kStateFormat = "qlora-trainer-state";
constexpr int kStateVersion = 1;
namespace fs = std::filesystem;

int64_t step_of(const fs::path& directory) {
  const std::string name = directory.filename().string();
  if (name.rfind("step-", 0) != 0) return -1;
  try {
    size_t used = 0;
    const int64_t step = std::stoll(name.substr(5), &used);
    return used == name.size() - 5 ? step : -1;
  } catch (const std::exception&) {
    return -1;
  }
}

std::vector<std::pair<int64_t, fs::path>> complete_checkpoints(const std::string& out_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code error;
  const fs::path folder = fs::path(out_dir) / "checkpoints";
  if (!fs::is_directory(folder, error)) return found;
  for (const auto& entry : fs::directory_iterator(folder, error)) {
    const int64_t step = step_of(entry.path());
    if (step >= 0 && fs::exists(entry.path() / "trainer_state.h5") &&
        fs::exists(entry.path() / "adapter_model.safetensors"))
      found.emplace_back(step, entry.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

void write_state(const std::string& path, const AdamW& optimizer, const CheckpointInfo& info,
                 const std::vector<std::string>& names) {
  using namespace shard::h5;
  silence_hdf5_errors();
  Handle file(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose);
  if (!file.valid()) throw UserError("cannot create " + path, "check free space and permissions of --out");
  Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
  write_string_attribute(root.get(), "format", kStateFormat, path);
  write_int_attribute(root.get(), "format_version", kStateVersion, path);
  write_int_attribute(root.get(), "step", info.step, path);
  write_int_attribute(root.get(), "optimizer_steps", optimizer.steps_taken(), path);
  write_int_attribute(root.get(), "seed", static_cast<int64_t>(info.seed), path);
  write_int_attribute(root.get(), "global_batch", info.global_batch, path);
  write_int_attribute(root.get(), "sequence_length", info.sequence_length, path);
  // Batches and dropout masks are functions of (seed, step): the step is the data cursor and the RNG.
  write_int_attribute(root.get(), "data_cursor", info.step, path);
  write_string_attribute(root.get(), "parameter_names", dump_json(Json(names)), path);
  const auto& first = optimizer.first_moments();
  const auto& second = optimizer.second_moments();
  for (const char* group_name : {"first_moment", "second_moment"}) {
    Handle group(H5Gcreate2(file.get(), group_name, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose);
    const auto& moments = std::string(group_name) == "first_moment" ? first : second;
    for (size_t i = 0; i < moments.size(); ++i) {
      auto contiguous = moments[i].contiguous();
      write_dataset(group.get(), std::to_string(i).c_str(), kernels::DType::f32, contiguous.numel(),
                    contiguous.data_ptr<float>(), path);
    }
  }
}

}  // namespace

void save_checkpoint(const std::string& directory, model::LlamaModelImpl& model, const AdamW& optimizer,
                     const CheckpointInfo& info, const std::string& base_model) {
  const std::string partial = directory + ".partial";
  std::error_code error;
  fs::remove_all(partial, error);
  fs::create_directories(partial, error);
  if (error) throw UserError("cannot create checkpoint folder " + partial + ": " + error.message());
  const auto named = model.named_lora_parameters();
  write_peft_adapter(partial, named, model.lora_config(), base_model);
  std::vector<std::string> names;
  for (const auto& [name, parameter] : named) names.push_back(name);
  write_state(partial + "/trainer_state.h5", optimizer, info, names);
  fs::remove_all(directory, error);
  fs::rename(partial, directory, error);
  if (error) throw UserError("cannot rename " + partial + " to " + directory + ": " + error.message());
}

std::string checkpoint_directory(const std::string& out_dir, int64_t step) {
  return out_dir + "/checkpoints/step-" + std::to_string(step);
}

std::string latest_checkpoint(const std::string& out_dir) {
  const auto found = complete_checkpoints(out_dir);
  return found.empty() ? "" : found.back().second.string();
}

void prune_checkpoints(const std::string& out_dir, int keep) {
  if (keep <= 0) return;
  auto found = complete_checkpoints(out_dir);
  std::error_code error;
  for (size_t i = 0; i + static_cast<size_t>(keep) < found.size(); ++i) fs::remove_all(found[i].second, error);
}

CheckpointInfo load_checkpoint(const std::string& directory, cluster::Communicator& communicator,
                               model::LlamaModelImpl& model, AdamW& optimizer) {
  auto named = model.named_lora_parameters();
  std::vector<torch::Tensor> first;
  std::vector<torch::Tensor> second;
  for (const auto& [name, parameter] : named) {
    first.push_back(torch::zeros_like(parameter));
    second.push_back(torch::zeros_like(parameter));
  }
  int64_t header[6] = {0, 0, 0, 0, 0, 0};  // ok, step, optimizer steps, seed, global batch, sequence length
  std::string failure;
  if (communicator.rank() == 0) {
    try {
      using namespace shard::h5;
      silence_hdf5_errors();
      auto adapter = shard::SafetensorsFile::open(directory + "/adapter_model.safetensors");
      const std::string state_path = directory + "/trainer_state.h5";
      Handle file(H5Fopen(state_path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose);
      if (!file.valid()) throw UserError("cannot open " + state_path);
      Handle root(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose);
      if (read_string_attribute(root.get(), "format", state_path) != kStateFormat)
        throw UserError(state_path + " is not a qlora trainer state");
      if (read_int_attribute(root.get(), "format_version", state_path) > kStateVersion)
        throw UserError(state_path + " was written by a newer qlora", "upgrade qlora to resume this run");
      const auto names = parse_json(read_string_attribute(root.get(), "parameter_names", state_path),
                                    state_path + " parameter_names");
      if (!names.is_array()) throw UserError(state_path + ": parameter_names is not a list of names");
      if (names.size() != named.size())
        throw UserError("checkpoint " + directory + " holds " + std::to_string(names.size()) +
                            " adapter tensors, this run has " + std::to_string(named.size()),
                        "resume with the LoRA targets, rank and model the checkpoint was trained with");
      for (size_t i = 0; i < named.size(); ++i) {
        const auto& [name, parameter] = named[i];
        const auto& entry = adapter->at(name);
        if (!names[i].is_string() || names[i].get<std::string>() != name || entry.shape != parameter.sizes().vec() ||
            entry.dtype != kernels::DType::f32)
          throw UserError("checkpoint " + directory + ": adapter tensor '" + name + "' does not match this run",
                          "resume with the LoRA targets, rank and model the checkpoint was trained with");
        torch::NoGradGuard no_grad;
        std::memcpy(parameter.data_ptr<float>(), adapter->data(entry), entry.end - entry.begin);
        read_hyperslab(file.get(), "/first_moment/" + std::to_string(i), kernels::DType::f32, parameter.numel(), 0,
                       parameter.numel(), first[i].data_ptr<float>(), state_path);
        read_hyperslab(file.get(), "/second_moment/" + std::to_string(i), kernels::DType::f32, parameter.numel(), 0,
                       parameter.numel(), second[i].data_ptr<float>(), state_path);
      }
      header[0] = 1;
      header[1] = read_int_attribute(root.get(), "step", state_path);
      header[2] = read_int_attribute(root.get(), "optimizer_steps", state_path);
      header[3] = read_int_attribute(root.get(), "seed", state_path);
      header[4] = read_int_attribute(root.get(), "global_batch", state_path);
      header[5] = read_int_attribute(root.get(), "sequence_length", state_path);
    } catch (const UserError& error) {
      failure = error.what();
    }
  }
  communicator.broadcast(header, sizeof header, 0);
  if (header[0] == 0) {
    if (communicator.rank() == 0) throw UserError("cannot resume from " + directory + ": " + failure);
    throw UserError("cannot resume", "", /*already_reported=*/true);
  }
  for (size_t i = 0; i < named.size(); ++i) {
    torch::NoGradGuard no_grad;
    communicator.broadcast(named[i].second.data_ptr<float>(), named[i].second.numel() * 4, 0);
    communicator.broadcast(first[i].data_ptr<float>(), first[i].numel() * 4, 0);
    communicator.broadcast(second[i].data_ptr<float>(), second[i].numel() * 4, 0);
  }
  if (header[2] > 0) optimizer.restore(header[2], std::move(first), std::move(second));
  CheckpointInfo info;
  info.step = header[1];
  info.seed = static_cast<uint64_t>(header[3]);
  info.global_batch = header[4];
  info.sequence_length = header[5];
  return info;
}

int64_t resume_training(const std::string& resume, const std::string& out_dir, const CheckpointInfo& run,
                        cluster::Communicator& communicator, model::LlamaModelImpl& model, AdamW& optimizer) {
  if (resume.empty()) return 0;
  std::string from = resume;
  if (from == "auto") {
    // Rank 0 decides (it is the one that writes checkpoints) and tells the others.
    from = communicator.rank() == 0 ? latest_checkpoint(out_dir) : "";
    int64_t length = static_cast<int64_t>(from.size());
    communicator.broadcast(&length, sizeof length, 0);
    from.resize(static_cast<size_t>(length));
    communicator.broadcast(from.data(), length, 0);
  }
  if (from.empty()) {
    log::banner("--resume auto: no checkpoint under " + out_dir + "/checkpoints; starting fresh");
    return 0;
  }
  const CheckpointInfo saved = load_checkpoint(from, communicator, model, optimizer);
  if (saved.seed != run.seed || saved.global_batch != run.global_batch || saved.sequence_length != run.sequence_length)
    log::banner("warning: resuming with a different seed, global batch or sequence length than " + from +
                " was trained with; the data order will not continue where it stopped");
  log::banner("resumed from " + from + " at step " + std::to_string(saved.step));
  return saved.step;
}

}  // namespace qlora::launcher
