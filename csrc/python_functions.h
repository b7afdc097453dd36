// Functions an op exposes as plain attributes of fastdl._C, called from Python without the torch
// dispatcher. For eager calls whose fixed cost matters more than their kernel (one streaming step of one
// layer: a few thousand multiply-adds), a pybind11 function costs ~1 µs where a dispatcher op called
// through torch.ops costs several. Ops stay registered with the dispatcher too: these are extra entry
// points for eager code, never the only one.
//
// An op file adds its functions with a namespace-scope
//   const fastdl::PythonFunctions registered([](PyObject* module) { ...; return 0; });
// which runs when the shared library is loaded; PyInit__C (module.cpp) then calls every such adder on the
// new module. An adder returns 0, or -1 with a Python exception set.
#pragma once

#include <Python.h>

#include <vector>

namespace fastdl {

using AddPythonFunctions = int (*)(PyObject* module);

std::vector<AddPythonFunctions>& python_function_adders();

struct PythonFunctions {
  explicit PythonFunctions(AddPythonFunctions add) { python_function_adders().push_back(add); }
};

}  // namespace fastdl
