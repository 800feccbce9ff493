// The extension module: the CPU kernels of engine/csrc, bound for engine/native.py.
#include <torch/extension.h>

#include <vector>

void append_attend(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                   const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                   const std::vector<int64_t>& positions, int64_t layer, const at::Tensor& out);
bool blend_attend_supported();
void blend_attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& q_pos,
                  const at::Tensor& out, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("append_attend", &append_attend, "append each sequence's new K/V and attend its queries over its cache");
  m.def("blend_attend_supported", &blend_attend_supported, "whether this CPU has AVX512-BF16");
  m.def("blend_attend", &blend_attend, "causal attention of sorted query positions over a whole cache (bf16)");
}
