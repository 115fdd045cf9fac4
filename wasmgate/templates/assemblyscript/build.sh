#!/usr/bin/env bash
# Build dist/{{lib}}.wasm: `npm ci` (pinned by package-lock.json) when node_modules is missing or
# older than the lock file, then the AssemblyScript compiler.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -d node_modules ] || [ package-lock.json -nt node_modules ]; then
    npm ci --no-audit --no-fund
    touch node_modules
fi
mkdir -p dist
npm run --silent build
echo "dist/{{lib}}.wasm ($(wc -c < dist/{{lib}}.wasm) bytes)"
