// Runs a `fpeft deploy aoti=true` package (NAME.aoti.pt2) from C++ with libtorch alone: no Python.
//
//   forecast MODEL.aoti.pt2 INPUTS.pt OUT.pt
//
// INPUTS.pt: the program's 12 inputs, in the order of NAME.json's "inputs" (x, x_attr, x_centers,
// x_angles, x_velocity_diff, x_padding_mask, lane_positions, lane_centers, lane_angles,
// lane_padding_mask, origin, theta), as Python's torch.save([...]) writes a list of tensors.
// OUT.pt: the outputs as a tuple that Python's torch.load reads: trajectories [B, 6, 60, 2] (world
// coordinates, the most probable mode first), probabilities [B, 6] and modes [B, 6].
//
// In a vehicle's or a service's own code, the inputs come from its own buffers instead, each as
// at::from_blob(data, {B, N, 50, 2}, at::kFloat) and so on, moved to the package's device: the
// package reads every input as a contiguous (row-major) tensor, so make each one contiguous, and
// it checks their shapes and dtypes only where AOTI_RUNTIME_CHECK_INPUTS=1 (set below).
// Build it against the torch Python package's libtorch: python -m forecast_peft.cpp OUT_BINARY.

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/jit/serialization/pickle.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::vector<char>(std::istreambuf_iterator<char>(in), {});
}

// torch's messages run on over lines: the first
std::string first_line(const std::exception& err) {
  const std::string what = err.what();
  return what.substr(0, what.find('\n'));
}

// what ``step`` returns, or its error as one line that names ``path``
template <typename Step>
auto naming(const std::string& path, const std::string& what, Step step) {
  try {
    return step();
  } catch (const std::exception& err) {
    std::string reason = first_line(err);
    // libtorch 2.11's AOTInductor calls print their reason themselves ("Error: input_handles[3]:
    // ...") and throw only where the call failed (2.13 keeps the reason in its error)
    if (reason.find("API call failed at") != std::string::npos) reason = "its reason is printed above";
    throw std::runtime_error(path + ": " + what + " (" + reason + ")");
  }
}

void write_file(const std::string& path, const std::vector<char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("cannot write " + path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: forecast MODEL.aoti.pt2 INPUTS.pt OUT.pt\n";
    return 2;
  }
  try {
    // the package checks each input's shape and dtype against the program's (one line, and no
    // forecast); without it, a wrong shape is read out of bounds without an error
    setenv("AOTI_RUNTIME_CHECK_INPUTS", "1", /*overwrite=*/0);
    c10::NoGradGuard no_grad;
    const std::string model(argv[1]);
    read_file(model);  // a missing file says so
    // the program (NAME.pt2) given for the package beside it: the error says which file to give
    const std::string suffix = ".aoti.pt2";
    const bool package_named =
        model.size() >= suffix.size() && model.compare(model.size() - suffix.size(), suffix.size(), suffix) == 0;
    const std::string what = package_named ? "cannot load it as an AOTInductor package"
                                           : "cannot load it as an AOTInductor package, which `fpeft deploy aoti=true` "
                                             "writes as NAME.aoti.pt2 beside the program NAME.pt2";
    auto loader = naming(model, what, [&] { return std::make_unique<torch::inductor::AOTIModelPackageLoader>(model); });
    const c10::Device device(loader->get_metadata().at("AOTI_DEVICE_KEY"));  // cpu or cuda
    const std::vector<char> saved_inputs = read_file(argv[2]);
    auto inputs = naming(argv[2], "not a list of 12 tensors saved by torch.save", [&] {
      std::vector<at::Tensor> tensors;
      for (const c10::IValue item : torch::jit::pickle_load(saved_inputs).toList()) {
        tensors.push_back(item.toTensor().to(device).contiguous());
      }
      if (tensors.size() != 12) throw std::runtime_error(std::to_string(tensors.size()) + " items");
      return tensors;
    });
    auto outputs = naming(argv[2], "the package refused these inputs", [&] { return loader->run(inputs); });
    std::vector<c10::IValue> saved;
    for (const at::Tensor& output : outputs) saved.emplace_back(output.cpu());
    write_file(argv[3], torch::jit::pickle_save(c10::ivalue::Tuple::create(std::move(saved))));
    std::cout << "forecasts of " << outputs[0].size(0) << " scenes (" << outputs[0].sizes() << "): " << argv[3] << "\n";
  } catch (const std::exception& err) {
    std::cerr << "forecast: " << first_line(err) << "\n";
    return 1;
  }
  return 0;
}
