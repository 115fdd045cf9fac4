#!/usr/bin/env bash
# Build dist/{{lib}}.wasm offline with Debian's toolchain (apt install rustc cargo
# libstd-rust-dev-wasm32 lld). Extra arguments go to cargo, e.g. `./build.sh --features body`.
# rustup's cargo (often first on PATH) has no wasm32-wasi target: always /usr/bin/cargo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export RUSTC=/usr/bin/rustc
/usr/bin/cargo build --offline --release --target wasm32-wasi "$@"
mkdir -p dist
cp "${CARGO_TARGET_DIR:-target}/wasm32-wasi/release/{{lib}}.wasm" dist/{{lib}}.wasm.tmp
mv dist/{{lib}}.wasm.tmp dist/{{lib}}.wasm
echo "dist/{{lib}}.wasm ($(wc -c < dist/{{lib}}.wasm) bytes)"
