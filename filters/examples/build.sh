#!/usr/bin/env bash
# Build the languages examples (the same filter in Rust, AssemblyScript and C) into
# filters/examples/dist/<lang>.wasm. ./dev test runs it (after installing the toolchains) and
# tests/filters/test_examples.py runs it again, which is cheap: each step is skipped when its
# output is newer than its inputs.
#   bash filters/examples/build.sh [rust] [assemblyscript] [c]     (default: all three)
# Toolchains: Debian's rustc/cargo (as filters/build.sh); Node.js + npm (npm ci installs the
# pinned AssemblyScript compiler and SDK from package-lock.json); clang-14 + wasi-libc.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FILTERS="$(dirname "$HERE")"
LANGS=("$@")
[ ${#LANGS[@]} -eq 0 ] && LANGS=(rust assemblyscript c)
mkdir -p "$HERE/dist"

fail() { echo "filters/examples/build.sh: $*" >&2; exit 1; }

# publish LANG FILE: into dist/ by rename, so a gateway or test reading it never sees half a file.
publish() { cp "$2" "$HERE/dist/$1.wasm.tmp" && mv "$HERE/dist/$1.wasm.tmp" "$HERE/dist/$1.wasm"; }

# newer OUT INPUT...: true when OUT exists and is newer than every INPUT.
newer() {
    local out=$1; shift
    [ -e "$out" ] || return 1
    [ -z "$(find "$@" -newer "$out" -print -quit)" ]
}

build_rust() {
    [ -x /usr/bin/cargo ] || fail "rust: /usr/bin/cargo not found (apt install rustc cargo libstd-rust-dev-wasm32 lld)"
    (cd "$FILTERS" && RUSTC=/usr/bin/rustc RUSTFLAGS="--remap-path-prefix=$FILTERS=filters" \
        /usr/bin/cargo build --offline --locked --release --target wasm32-wasi -p example-rust -q)
    publish rust "$FILTERS/target/wasm32-wasi/release/example_rust.wasm"
}

build_assemblyscript() {
    local dir=$HERE/assemblyscript
    command -v npm >/dev/null || fail "assemblyscript: npm not found (apt install nodejs npm)"
    # npm ci: exactly the versions in package-lock.json; again only when the lock changed.
    if ! newer "$dir/node_modules/.ci-stamp" "$dir/package-lock.json"; then
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error) || fail "assemblyscript: npm ci failed"
        touch "$dir/node_modules/.ci-stamp"
    fi
    if ! newer "$dir/build/filter.wasm" "$dir/assembly" "$dir/package.json" "$dir/node_modules/.ci-stamp"; then
        (cd "$dir" && npm run --silent build) || fail "assemblyscript: asc failed"
    fi
    publish assemblyscript "$dir/build/filter.wasm"
}

build_c() {
    local dir=$HERE/c cc=/usr/bin/clang-14
    [ -x "$cc" ] || fail "c: $cc not found (apt install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)"
    mkdir -p "$dir/build"
    # -mexec-model=reactor: wasi-libc's reactor start file, so the module exports _initialize.
    "$cc" --target=wasm32-wasi -mexec-model=reactor -O2 -Wall -Wextra -Werror -Wno-unused-parameter \
        -Wl,--strip-debug -o "$dir/build/filter.wasm" "$dir/filter.c"
    publish c "$dir/build/filter.wasm"
}

for lang in "${LANGS[@]}"; do
    case "$lang" in
        rust|assemblyscript|c) "build_$lang" ;;
        *) fail "unknown language '$lang' (rust, assemblyscript, c)" ;;
    esac
    echo "filters/examples/build.sh: dist/$lang.wasm ($(wc -c < "$HERE/dist/$lang.wasm") bytes)"
done
