// The instruction set the CPU kernels run (see isa.h), and its Python entry points in fastdl._C:
//   cpu_isa_supported() -> str, cpu_isa() -> str, set_cpu_isa(name: str) -> str (the ISA now in use)
// fastdl/_cpu_isa.py applies FASTDL_CPU_ISA through set_cpu_isa when fastdl is imported.
#include "isa.h"

#include <stdexcept>
#include <string>

#include "../python_functions.h"

namespace fastdl {
namespace cpu {

namespace {

CpuIsa detect() {
#ifdef FASTDL_X86_64
  __builtin_cpu_init();
  // The x86-64 levels are what FASTDL_TARGET_AVX2 / _AVX512 compile for (GCC ≥ 12 and clang name them).
  // libgcc's checks include the OS's support for the wider register state (XGETBV).
#if defined(__clang__) || __GNUC__ >= 12
  if (__builtin_cpu_supports("x86-64-v4")) return CpuIsa::avx512;
  if (__builtin_cpu_supports("x86-64-v3")) return CpuIsa::avx2;
#else
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return CpuIsa::avx512;
  if (v3) return CpuIsa::avx2;
#endif
#endif
  return CpuIsa::baseline;
}

CpuIsa isa_named(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::baseline, CpuIsa::avx2, CpuIsa::avx512})
    if (name == cpu_isa_name(isa)) return isa;
  throw std::invalid_argument("set_cpu_isa: unknown instruction set '" + name +
                              "'; expected one of baseline, avx2, avx512");
}

}  // namespace

namespace isa_detail {
std::atomic<int> active{static_cast<int>(cpu_isa_supported())};
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512: return "avx512";
    case CpuIsa::avx2: return "avx2";
    case CpuIsa::baseline: break;
  }
  return "baseline";
}

CpuIsa cpu_isa_supported() {
  static const CpuIsa supported = detect();
  return supported;
}

CpuIsa set_cpu_isa(CpuIsa cap) {
  const CpuIsa isa = static_cast<int>(cap) < static_cast<int>(cpu_isa_supported()) ? cap : cpu_isa_supported();
  isa_detail::active.store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa;
}

namespace {

const PythonFunctions registered([](PyObject* module) {
  return define_pybind11(module, [](pybind11::module_ m) {
    m.def("cpu_isa_supported", [] { return std::string(cpu_isa_name(cpu_isa_supported())); },
          "The best instruction set of this CPU the kernels can use: 'baseline', 'avx2' or 'avx512'.");
    m.def("cpu_isa", [] { return std::string(cpu_isa_name(cpu_isa())); },
          "The instruction set the CPU kernels run now.");
    m.def("set_cpu_isa",
          [](const std::string& name) { return std::string(cpu_isa_name(set_cpu_isa(isa_named(name)))); },
          pybind11::arg("name"),
          "Caps the CPU kernels' instruction set at `name` (clamped to what the CPU supports); returns the "
          "one now in use.");
  });
});

}  // namespace

}  // namespace cpu
}  // namespace fastdl
