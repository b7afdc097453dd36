#!/usr/bin/env bash
# Builds fastdl._C with AddressSanitizer and UndefinedBehaviorSanitizer and runs the CPU tests under them.
#
#   scripts/sanitize.sh [pytest arguments]      (default: every CPU test but Triton's interpreter)
#
# Run it from the environment the README's test command sets up (torch, pytest, hypothesis). The build
# goes into a scratch copy of this checkout, so the checkout's own extension is left alone; Python is not
# instrumented, so the sanitizer runtimes are preloaded. Any report fails the run (halt_on_error); leak
# checking is off, since CPython and torch keep allocations alive until exit by design.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
cxx="${CXX:-g++}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The sources as they are now (tracked and new files), without build outputs.
(cd "$root" && git ls-files --cached --others --exclude-standard -z | xargs -0 cp --parents -t "$work")

sanitizers="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
echo "building fastdl._C with ASan + UBSan in $work"
(cd "$work" && CFLAGS="$sanitizers" LDFLAGS="-fsanitize=address,undefined" FASTDL_CUDA=0 \
    MAX_JOBS="${MAX_JOBS:-2}" "$python" setup.py build_ext --inplace > build.log 2>&1) || {
    tail -n 50 "$work/build.log"; exit 1; }

export LD_PRELOAD="$("$cxx" -print-file-name=libasan.so) $("$cxx" -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:alloc_dealloc_mismatch=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
cd "$work"
# The tests must load the sanitized extension, not an installed one.
"$python" -c "import fastdl._extension as e, sys; f = e._C.__file__; print('testing', f); sys.exit(not f.startswith('$work'))"
if [ "$#" -eq 0 ]; then
    set -- tests/ -q -p no:cacheprovider -k "not triton" --ignore=tests/test_cuda_build.py \
        --ignore=tests/test_packaging.py
fi
"$python" -m pytest "$@"
