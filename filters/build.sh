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
export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
FILTERS=(auth ratelimit headers risk)
# Debian's packaged crates the SDK depends on (../.cargo/config.toml points cargo at them).
CRATE_PACKAGES="librust-sha2-dev librust-sha1-dev librust-hmac-dev librust-subtle-dev librust-base64-dev"

for tool in "$CARGO" "$RUSTC"; do
    [ -x "$tool" ] || { echo "filters/build.sh: $tool not found (apt install rustc cargo libstd-rust-dev-wasm32 lld)" >&2; exit 1; }
done
if ! "$RUSTC" --print target-libdir --target wasm32-wasi >/dev/null 2>&1 \
   || [ ! -d "$("$RUSTC" --print target-libdir --target wasm32-wasi)" ]; then
    echo "filters/build.sh: no wasm32-wasi std for $RUSTC (apt install libstd-rust-dev-wasm32)" >&2
    exit 1
fi

cd "$HERE"
# The lock and the packaged crates, checked up front so the message says how to fix them.
if ! err=$("$CARGO" metadata --offline --locked --format-version 1 2>&1 >/dev/null); then
    echo "$err" >&2
    if grep -q -- "--locked" <<<"$err"; then
        cat >&2 <<EOF
filters/build.sh: filters/Cargo.lock is out of date (a dependency was added or changed).
Refresh it offline with Debian's cargo, then commit it:
    RUSTC=/usr/bin/rustc /usr/bin/cargo update --offline --workspace --manifest-path filters/Cargo.toml
(from the repository root; it adds what changed and keeps every other pinned version. Re-resolve
everything with: ... /usr/bin/cargo generate-lockfile --offline --manifest-path filters/Cargo.toml)
EOF
    elif grep -q "no matching package" <<<"$err"; then
        echo "filters/build.sh: crates come only from Debian (/usr/share/cargo/registry): apt install librust-NAME-dev (the SDK needs: $CRATE_PACKAGES)" >&2
    fi
    exit 1
fi
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
