// fastdl._C: the compiled kernels. Importing the module runs the static TORCH_LIBRARY registrations of
// every csrc/cpu/*.cpp and csrc/cuda/*.cpp linked into it; the ops are then reached through
// torch.ops.fastdl.*. The module itself tells Python how it was built and holds the few functions ops
// expose outside the dispatcher (see python_functions.h).
#include <Python.h>

#include "python_functions.h"

namespace fastdl {

std::vector<AddPythonFunctions>& python_function_adders() {
  static std::vector<AddPythonFunctions> adders;  // filled by static initializers, before PyInit__C
  return adders;
}

}  // namespace fastdl

static struct PyModuleDef fastdl_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastdl's compiled kernels (reached through torch.ops.fastdl)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastdl_c_module);
  if (module == nullptr) return nullptr;
#ifdef FASTDL_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "built_with_cuda", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  for (const fastdl::AddPythonFunctions add : fastdl::python_function_adders()) {
    if (add(module) != 0) {
      Py_DECREF(module);
      return nullptr;
    }
  }
  return module;
}
