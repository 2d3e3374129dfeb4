// Op schemas for every slimfit kernel: the one place that lists the torch.ops.slimfit namespace.
// Kernels register per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake kernels live in slimfit/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Lets `import slimfit._C` load this library, which runs the static op registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(slimfit, m) {
  // Per-group min/max quantization; format documented in slimfit/reference.py.
  m.def("quantize(Tensor x, int bits, int group_size, int? seed) -> (Tensor codes, Tensor scale, Tensor offset)");
  m.def("dequantize(Tensor codes, Tensor scale, Tensor offset, int bits, int group_size, int[] shape, "
        "ScalarType dtype) -> Tensor");
  // Top-k per row with uint16 block-relative column indices; format documented in slimfit/reference.py.
  m.def("sparsify(Tensor x, int k) -> (Tensor values, Tensor indices, Tensor block_offsets)");
  m.def("densify(Tensor values, Tensor indices, Tensor block_offsets, int[] shape) -> Tensor");
  // Bool tensor <-> 1 bit per element, little-endian within a byte.
  m.def("pack_bits(Tensor mask) -> Tensor");
  m.def("unpack_bits(Tensor packed, int[] shape) -> Tensor");
  // Relative change per (before, after) pair; metric "rel_l2" or "rel_l1_mean", eps floors the denominator.
  m.def("update_norms(Tensor[] before, Tensor[] after, str metric, float eps) -> Tensor");
}
