#!/usr/bin/env bash
# Build dist/{{lib}}.wasm with Debian's clang and wasi-libc
# (apt install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32).
# -mexec-model=reactor: the module exports _initialize, as a Proxy-Wasm host expects.
# proxy_wasm.h comes from the wasmgate installation that generated this project.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
mkdir -p dist
/usr/bin/clang-14 --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Wno-unused-parameter \
    -Wl,--strip-debug -I '{{include}}' -o dist/{{lib}}.wasm filter.c
echo "dist/{{lib}}.wasm ($(wc -c < dist/{{lib}}.wasm) bytes)"
