#!/usr/bin/env bash
# Build every filter in release for wasm32-wasi into filters/dist/<name>.wasm — offline.
# Works from any directory (./dev build and ./dev test call it from the repo root).
# Uses Debian's toolchain: rustup's cargo (often first on PATH) has no wasm target and
# writes a Cargo.lock v4 that Debian's cargo rejects.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CARGO=/usr/bin/cargo
export RUSTC=/usr/bin/rustc
FILTERS=(auth ratelimit headers risk)

for tool in "$CARGO" "$RUSTC"; do
    [ -x "$tool" ] || { echo "filters/build.sh: $tool not found (apt install rustc cargo libstd-rust-dev-wasm32 lld)" >&2; exit 1; }
done
if ! "$RUSTC" --print target-libdir --target wasm32-wasi >/dev/null 2>&1 \
   || [ ! -d "$("$RUSTC" --print target-libdir --target wasm32-wasi)" ]; then
    echo "filters/build.sh: no wasm32-wasi std for $RUSTC (apt install libstd-rust-dev-wasm32)" >&2
    exit 1
fi

cd "$HERE"
pkgs=()
for f in "${FILTERS[@]}"; do pkgs+=(-p "$f"); done
"$CARGO" build --offline --locked --release --target wasm32-wasi "${pkgs[@]}"

mkdir -p dist
for f in "${FILTERS[@]}"; do
    src="target/wasm32-wasi/release/$f.wasm"
    [ -s "$src" ] || { echo "filters/build.sh: $src was not produced" >&2; exit 1; }
    cp "$src" "dist/$f.wasm.tmp"
    mv "dist/$f.wasm.tmp" "dist/$f.wasm"
    echo "filters/build.sh: dist/$f.wasm ($(wc -c < "dist/$f.wasm") bytes)"
done
