// Functions exposed as plain attributes of fastdl._C, called from Python without the torch dispatcher:
// the CPU instruction-set control (cpu/isa.cpp), and ops' eager fast paths. For eager calls whose fixed cost matters more than their kernel (one streaming step of one
// layer: a few thousand multiply-adds), a pybind11 function costs ~1 µs where a dispatcher op called
// through torch.ops costs several. Ops stay registered with the dispatcher too: these are extra entry
// points for eager code, never the only one.
//
// A source file adds its functions with a namespace-scope
//   const fastdl::PythonFunctions registered([](PyObject* module) { ...; return 0; });
// (pybind11 functions through define_pybind11), which runs when the shared library is loaded; PyInit__C
// (module.cpp) then calls every such adder on the new module. An adder returns 0, or -1 with a Python
// exception set.
#pragma once

#include <Python.h>
#include <torch/csrc/utils/pybind.h>

#include <vector>

namespace fastdl {

using AddPythonFunctions = int (*)(PyObject* module);

std::vector<AddPythonFunctions>& python_function_adders();

struct PythonFunctions {
  explicit PythonFunctions(AddPythonFunctions add) { python_function_adders().push_back(add); }
};

// For an adder that defines pybind11 functions: define(module) with the module as a pybind11::module_, a
// pybind11 error turned into the adder's -1 with the Python exception set.
template <typename Define>
int define_pybind11(PyObject* module, Define define) {
  try {
    define(pybind11::reinterpret_borrow<pybind11::module_>(module));
  } catch (pybind11::error_already_set& error) {
    error.restore();
    return -1;
  }
  return 0;
}

}  // namespace fastdl
