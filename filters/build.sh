#!/usr/bin/env bash
# Build every filter in release for wasm32-wasi into filters/dist/<name>.wasm — offline.
# Works from any directory (./dev build and ./dev test call it from the repo root).
# Uses Debian's toolchain: rustup's cargo (often first on PATH) has no wasm target and
# writes a Cargo.lock v4 that Debian's cargo rejects.
#   --check   also fail if the fresh build differs from the committed dist/*.wasm
#             (builds are reproducible, so a difference means dist/ was not rebuilt)
set -euo pipefail
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1
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
# Reproducible output wherever the checkout lives: panic locations name "filters/..." instead
# of the absolute path, so a fresh build in CI is byte-identical to the committed dist/.
export RUSTFLAGS="--remap-path-prefix=$HERE=filters ${RUSTFLAGS:-}"
# One cargo invocation per filter: features of the SDK are resolved per invocation, so a filter
# that does not enable the SDK's body callbacks does not get them from a sibling that does.
for f in "${FILTERS[@]}"; do
    "$CARGO" build --offline --locked --release --target wasm32-wasi -p "$f"
done

mkdir -p dist
stale=()
for f in "${FILTERS[@]}"; do
    src="target/wasm32-wasi/release/$f.wasm"
    [ -s "$src" ] || { echo "filters/build.sh: $src was not produced" >&2; exit 1; }
    if [ "$CHECK" = 1 ] && ! cmp -s "$src" "dist/$f.wasm"; then stale+=("$f"); fi
    cp "$src" "dist/$f.wasm.tmp"
    mv "dist/$f.wasm.tmp" "dist/$f.wasm"
    echo "filters/build.sh: dist/$f.wasm ($(wc -c < "dist/$f.wasm") bytes)"
done
if [ ${#stale[@]} -gt 0 ]; then
    echo "filters/build.sh: committed dist/ was stale for: ${stale[*]} (now rebuilt; commit filters/dist)" >&2
    exit 1
fi
