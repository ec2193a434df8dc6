// Checkpoint writing (in-memory HDF5 image, checked POSIX writes, manifest, read-back verification),
// discovery, pruning and collective loading.
#include "launcher/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "common/atomic_file.h"
#include "common/hash.h"
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
constexpr const char* kManifestName = "checkpoint.json";
constexpr const char* kManifestFormat = "qlora-checkpoint";
constexpr int kManifestVersion = 1;
constexpr const char* kAdapterName = "adapter_model.safetensors";
constexpr const char* kAdapterConfigName = "adapter_config.json";
constexpr const char* kStateName = "trainer_state.h5";
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

struct FileDigest {
  int64_t bytes = -1;  // -1: unreadable
  std::string checksum;
};

// Size and FNV-1a 64 of a file as it is on disk now.
FileDigest digest_file(const std::string& path) {
  FileDigest digest;
  std::ifstream file(path, std::ios::binary);
  if (!file) return digest;
  Fnv1a64 hash;
  std::vector<char> chunk(1 << 20);
  int64_t total = 0;
  while (file) {
    file.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    const std::streamsize got = file.gcount();
    if (got <= 0) break;
    hash.update(chunk.data(), static_cast<size_t>(got));
    total += got;
  }
  if (file.bad()) return digest;
  digest.bytes = total;
  digest.checksum = hash.hex();
  return digest;
}

// trainer_state.h5 built in memory (HDF5's core driver without a backing store) and returned as the
// file's bytes: HDF5 never writes to the run folder, so a full disk meets only our checked POSIX
// writes, never a half-flushed HDF5 file or its library teardown.
std::string trainer_state_image(const AdamW& optimizer, const CheckpointInfo& info, const std::vector<std::string>& names,
                                const std::string& path) {
  using namespace shard::h5;
  silence_hdf5_errors();
  Handle access(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  if (!access.valid() || H5Pset_fapl_core(access.get(), 1 << 20, /*backing_store=*/0) < 0)
    throw UserError("cannot set up HDF5's in-memory driver for " + path);
  Handle file(H5Fcreate(kStateName, H5F_ACC_TRUNC, H5P_DEFAULT, access.get()), H5Fclose);
  if (!file.valid()) throw UserError("cannot create the trainer state " + path + " in memory");
  {
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
      if (!group.valid()) throw UserError(path + ": cannot create group " + group_name);
      const auto& moments = std::string(group_name) == "first_moment" ? first : second;
      for (size_t i = 0; i < moments.size(); ++i) {
        auto contiguous = moments[i].contiguous();
        write_dataset(group.get(), std::to_string(i).c_str(), kernels::DType::f32, contiguous.numel(),
                      contiguous.data_ptr<float>(), path);
      }
      if (!group.close()) throw UserError(path + ": cannot close group " + group_name);
    }
    if (!root.close()) throw UserError(path + ": cannot close the root group");
  }
  if (H5Fflush(file.get(), H5F_SCOPE_GLOBAL) < 0) throw UserError(path + ": cannot flush the in-memory image");
  const ssize_t size = H5Fget_file_image(file.get(), nullptr, 0);
  if (size <= 0) throw UserError(path + ": cannot take the in-memory image");
  std::string image(static_cast<size_t>(size), '\0');
  if (H5Fget_file_image(file.get(), image.data(), image.size()) != size)
    throw UserError(path + ": cannot copy the in-memory image");
  if (!file.close()) throw UserError(path + ": cannot close the in-memory file");
  return image;
}

std::string checksum_of(std::string_view bytes) {
  Fnv1a64 hash;
  hash.update(bytes.data(), bytes.size());
  return hash.hex();
}

Json identity_json(const RunIdentity& identity) {
  Json json = Json::object();
  for (const auto& [key, value] : identity) json[key] = value;
  return json;
}

RunIdentity identity_from_json(const Json& json) {
  RunIdentity identity;
  if (!json.is_object()) return identity;
  for (const auto& [key, value] : json.items())
    if (value.is_string()) identity[key] = value.get<std::string>();
  return identity;
}

Json read_manifest(const std::string& directory) {
  const std::string path = directory + "/" + kManifestName;
  std::ifstream file(path, std::ios::binary);
  if (!file) throw UserError("no " + std::string(kManifestName) + " (an unfinished save, or a checkpoint of an older qlora)");
  std::string text((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  Json manifest = parse_json(text, path);
  if (!manifest.is_object() || json_string_or(manifest, "format", "", path) != kManifestFormat)
    throw UserError(path + " is not a qlora checkpoint manifest");
  if (json_int(manifest, "format_version", path) > kManifestVersion)
    throw UserError(path + " was written by a newer qlora");
  return manifest;
}

[[noreturn]] void save_failed(const std::string& directory, const std::string& reason, const std::string& hint) {
  throw UserError("cannot save checkpoint " + directory + ": " + reason,
                  (hint.empty() ? std::string("check free space and permissions of --out") : hint) +
                      "; the checkpoints saved before are intact (resume with --resume auto)");
}

// Writes every file of the checkpoint into `partial` and returns the manifest's "files" entries,
// each checked against what reads back from disk.
Json write_checkpoint_files(const std::string& partial, model::LlamaModelImpl& model, const AdamW& optimizer,
                            const CheckpointInfo& info, const std::string& base_model) {
  const auto named = model.named_lora_parameters();
  write_peft_adapter(partial, named, model.lora_config(), base_model);
  std::vector<std::string> names;
  for (const auto& [name, parameter] : named) names.push_back(name);
  const std::string state_path = partial + "/" + kStateName;
  const std::string image = trainer_state_image(optimizer, info, names, state_path);
  write_file_atomically(state_path, image);

  Json files = Json::object();
  for (const char* name : {kAdapterName, kAdapterConfigName, kStateName}) {
    const FileDigest digest = digest_file(partial + "/" + name);
    if (digest.bytes < 0) throw UserError("cannot read back " + partial + "/" + name);
    files[name] = Json{{"bytes", digest.bytes}, {"fnv1a64", digest.checksum}};
  }
  // What we meant to write against what the disk holds: a short or altered write fails here.
  if (files[kStateName]["fnv1a64"] != checksum_of(image) || files[kStateName]["bytes"] != static_cast<int64_t>(image.size()))
    throw UserError(state_path + " reads back differently from what was written (" +
                    std::to_string(files[kStateName]["bytes"].get<int64_t>()) + " of " + std::to_string(image.size()) +
                    " bytes)");
  shard::SafetensorsFile::open(partial + "/" + kAdapterName);  // a structurally complete adapter
  return files;
}

}  // namespace

std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& out_dir) {
  std::vector<std::pair<int64_t, std::string>> found;
  std::error_code error;
  const fs::path folder = fs::path(out_dir) / "checkpoints";
  if (!fs::is_directory(folder, error)) return found;
  for (const auto& entry : fs::directory_iterator(folder, error)) {
    const int64_t step = step_of(entry.path());
    if (step >= 0 && fs::exists(entry.path() / kManifestName, error)) found.emplace_back(step, entry.path().string());
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::string checkpoint_problem(const std::string& directory) {
  Json manifest;
  try {
    manifest = read_manifest(directory);
  } catch (const UserError& error) {
    return error.what();
  }
  const auto files = manifest.find("files");
  if (files == manifest.end() || !files->is_object() || !files->contains(kStateName) || !files->contains(kAdapterName))
    return std::string(kManifestName) + " lists no trainer state or adapter";
  for (const auto& [name, expected] : files->items()) {
    const FileDigest digest = digest_file(directory + "/" + name);
    if (digest.bytes < 0) return name + " is missing or unreadable";
    if (!expected.is_object() || !expected.contains("bytes") || !expected.contains("fnv1a64"))
      return std::string(kManifestName) + ": malformed entry for " + name;
    if (expected["bytes"] != digest.bytes)
      return name + " has " + std::to_string(digest.bytes) + " bytes, the manifest says " + expected["bytes"].dump();
    if (expected["fnv1a64"] != digest.checksum)
      return name + " does not match its checksum (fnv1a64 " + digest.checksum + ", manifest " +
             expected["fnv1a64"].dump() + ")";
  }
  return "";
}

void save_checkpoint(const std::string& directory, model::LlamaModelImpl& model, const AdamW& optimizer,
                     const CheckpointInfo& info, const std::string& base_model) {
  const std::string partial = directory + ".partial";
  std::error_code error;
  fs::remove_all(partial, error);
  fs::create_directories(partial, error);
  if (error) save_failed(directory, "cannot create " + partial + ": " + error.message(), "");
  try {
    Json manifest;
    manifest["format"] = kManifestFormat;
    manifest["format_version"] = kManifestVersion;
    manifest["step"] = info.step;
    manifest["identity"] = identity_json(info.identity);
    manifest["files"] = write_checkpoint_files(partial, model, optimizer, info, base_model);
    // Last: its presence is what makes the folder a checkpoint.
    write_file_atomically(partial + "/" + kManifestName, dump_json(manifest, 2) + "\n");
    sync_path(partial);
    fs::remove_all(directory, error);
    if (error) throw UserError("cannot remove the old " + directory + ": " + error.message());
    fs::rename(partial, directory, error);
    if (error) throw UserError("cannot rename " + partial + " to " + directory + ": " + error.message());
    sync_path(fs::path(directory).parent_path().string());
  } catch (const UserError& failure) {
    fs::remove_all(partial, error);
    save_failed(directory, failure.what(), failure.hint);
  }
}

void save_final_adapter(const std::string& out_dir, model::LlamaModelImpl& model, const model::LoraConfig& lora,
                        const std::string& base_model) {
  const std::string final_dir = out_dir + "/final";
  const std::string partial = final_dir + ".partial";
  std::error_code error;
  fs::remove_all(partial, error);
  try {
    write_peft_adapter(partial, model.named_lora_parameters(), lora, base_model);
    sync_path(partial);
    fs::remove_all(final_dir, error);
    fs::rename(partial, final_dir, error);
    if (error) throw UserError("cannot rename " + partial + " to " + final_dir + ": " + error.message());
  } catch (const UserError& failure) {
    fs::remove_all(partial, error);
    throw UserError("cannot write the final adapter " + final_dir + ": " + failure.what(),
                    failure.hint.empty() ? "check free space and permissions of --out" : failure.hint);
  }
}

std::string checkpoint_directory(const std::string& out_dir, int64_t step) {
  return out_dir + "/checkpoints/step-" + std::to_string(step);
}

std::string latest_checkpoint(const std::string& out_dir, std::vector<std::string>* skipped) {
  // Every step-K folder counts here, with or without a manifest, so that each one passed over is named.
  std::vector<std::pair<int64_t, std::string>> candidates;
  std::error_code error;
  const fs::path folder = fs::path(out_dir) / "checkpoints";
  if (fs::is_directory(folder, error))
    for (const auto& entry : fs::directory_iterator(folder, error))
      if (step_of(entry.path()) >= 0) candidates.emplace_back(step_of(entry.path()), entry.path().string());
  std::sort(candidates.rbegin(), candidates.rend());
  for (const auto& [step, directory] : candidates) {
    const std::string problem = checkpoint_problem(directory);
    if (problem.empty()) return directory;
    if (skipped != nullptr) skipped->push_back(directory + ": " + problem);
  }
  return "";
}

void prune_checkpoints(const std::string& out_dir, int keep) {
  if (keep <= 0) return;
  auto found = complete_checkpoints(out_dir);
  std::error_code error;
  for (size_t i = 0; i + static_cast<size_t>(keep) < found.size(); ++i) fs::remove_all(found[i].second, error);
}

std::vector<std::string> identity_differences(const RunIdentity& checkpoint, const RunIdentity& run) {
  std::vector<std::string> differences;
  for (const auto& [key, value] : run) {
    const auto saved = checkpoint.find(key);
    if (saved == checkpoint.end()) continue;  // a field an older writer did not record
    if (saved->second != value)
      differences.push_back(key + ": checkpoint " + (saved->second.empty() ? "(none)" : saved->second) + ", this run " +
                            (value.empty() ? "(none)" : value));
  }
  return differences;
}

CheckpointInfo load_checkpoint(const std::string& directory, cluster::Communicator& communicator,
                               model::LlamaModelImpl& model, AdamW& optimizer, const CheckpointInfo& run,
                               ResumeMismatch mismatch) {
  auto named = model.named_lora_parameters();
  std::vector<torch::Tensor> first;
  std::vector<torch::Tensor> second;
  for (const auto& [name, parameter] : named) {
    first.push_back(torch::zeros_like(parameter));
    second.push_back(torch::zeros_like(parameter));
  }
  int64_t header[6] = {0, 0, 0, 0, 0, 0};  // ok, step, optimizer steps, seed, global batch, sequence length
  std::string failure;
  std::string failure_hint = "resume with the LoRA targets, rank and model the checkpoint was trained with";
  if (communicator.rank() == 0) {
    try {
      const std::string problem = checkpoint_problem(directory);
      if (!problem.empty()) {
        failure_hint = "pass an intact checkpoint folder, or --resume auto to take the newest one that verifies";
        throw UserError(problem);
      }
      const auto differences =
          identity_differences(identity_from_json(read_manifest(directory).value("identity", Json::object())), run.identity);
      if (!differences.empty()) {
        std::string listed;
        for (const auto& difference : differences) listed += "\n  " + difference;
        if (mismatch == ResumeMismatch::refuse) {
          failure_hint = "resume with the same model, data, LoRA shape and seed, train into another --out, or pass "
                         "--resume-mismatch warn to continue anyway";
          throw UserError("it was written by a different run:" + listed);
        }
        log::banner("warning: resuming from " + directory + ", written by a different run (--resume-mismatch warn):" + listed);
      }
      using namespace shard::h5;
      silence_hdf5_errors();
      auto adapter = shard::SafetensorsFile::open(directory + "/" + kAdapterName);
      const std::string state_path = directory + "/" + kStateName;
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
        throw UserError("it holds " + std::to_string(names.size()) + " adapter tensors, this run has " +
                        std::to_string(named.size()));
      for (size_t i = 0; i < named.size(); ++i) {
        const auto& [name, parameter] = named[i];
        const auto* entry = adapter->find(name);
        if (entry == nullptr || !names[i].is_string() || names[i].get<std::string>() != name ||
            entry->shape != parameter.sizes().vec() || entry->dtype != kernels::DType::f32)
          throw UserError("adapter tensor '" + name + "' does not match this run");
        torch::NoGradGuard no_grad;
        std::memcpy(parameter.data_ptr<float>(), adapter->data(*entry), entry->end - entry->begin);
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
      if (!error.hint.empty()) failure_hint = error.hint;
    }
  }
  communicator.broadcast(header, sizeof header, 0);
  if (header[0] == 0) {
    if (communicator.rank() == 0) throw UserError("cannot resume from " + directory + ": " + failure, failure_hint);
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
                        cluster::Communicator& communicator, model::LlamaModelImpl& model, AdamW& optimizer,
                        ResumeMismatch mismatch) {
  if (resume.empty()) return 0;
  std::string from = resume;
  if (from == "auto") {
    // Rank 0 decides (it is the one that writes checkpoints) and tells the others.
    std::vector<std::string> skipped;
    from = communicator.rank() == 0 ? latest_checkpoint(out_dir, &skipped) : "";
    for (const auto& line : skipped) log::banner("--resume auto: skipping " + line);
    int64_t length = static_cast<int64_t>(from.size());
    communicator.broadcast(&length, sizeof length, 0);
    from.resize(static_cast<size_t>(length));
    communicator.broadcast(from.data(), length, 0);
  }
  if (from.empty()) {
    log::banner("--resume auto: no usable checkpoint under " + out_dir + "/checkpoints; starting fresh");
    return 0;
  }
  const CheckpointInfo saved = load_checkpoint(from, communicator, model, optimizer, run, mismatch);
  if (saved.global_batch != run.global_batch || saved.sequence_length != run.sequence_length)
    log::banner("warning: resuming with a different global batch or sequence length than " + from +
                " was trained with; the data order will not continue where it stopped");
  log::banner("resumed from " + from + " at step " + std::to_string(saved.step));
  return saved.step;
}

}  // namespace qlora::launcher
