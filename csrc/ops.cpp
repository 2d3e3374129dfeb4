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
}
