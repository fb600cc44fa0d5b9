#!/usr/bin/env bash
# Configure, build and run the C++ tests of the extension in build/cmake (see CMakeLists.txt).
# Uses .venv/bin/python (or $PYTHON, or python3) to locate libtorch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
PREFIX="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
GEN=()
if command -v ninja >/dev/null 2>&1; then GEN=(-G Ninja); fi
cmake -S . -B build/cmake "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build build/cmake -j "${MAX_JOBS:-2}"
ctest --test-dir build/cmake --output-on-failure
