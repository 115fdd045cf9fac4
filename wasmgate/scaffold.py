"""`wasmgate new filter NAME [--lang rust] [--dir DIR]`: a ready filter project from the
templates in wasmgate/templates/<lang>/ — source with a root and an HTTP context, a build
script, a gateway config snippet, and a test that passes with the pytest plugin."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
LANGS = ("rust", "assemblyscript", "c")               # each has templates/<lang>/
# What differs per language in templates/common/ (the generated test and conftest.py).
LANG_VALUES = {
    "rust": {"config_hi": '{"greeting": "hi"}', "config_bad": '{"greting": "typo"}', "bad_match": "greting",
             "options": "", "sources": 'HERE / "src", HERE / "Cargo.toml"'},
    "assemblyscript": {"config_hi": '"hi"', "config_bad": '"two\\nlines"', "bad_match": "one line",
                       "options": ', root_id="{{lib}}"',   # the SDK picks its root context by it
                       "sources": 'HERE / "assembly", HERE / "package.json", HERE / "package-lock.json"'},
    "c": {"config_hi": '"hi"', "config_bad": '"two\\nlines"', "bad_match": "one line", "options": "",
          "sources": 'HERE / "filter.c"'},
}
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
# Template files whose real name starts with a dot (kept visible in the package).
_RENAMES = {"dot-cargo": ".cargo", "dot-gitignore": ".gitignore"}


class ScaffoldError(Exception):
    pass


CLANG = "/usr/bin/clang-14"


def _from_install(env: str, relatives: list[str], what: str) -> Path:
    """A file or directory of this wasmgate installation: $env, else the checkout the package is
    installed from (pip install -e, as ./dev does)."""
    checkout = Path(__file__).resolve().parents[1]
    candidates = [Path(os.environ[env])] if os.environ.get(env) else []
    candidates += [checkout / r for r in relatives]
    for c in candidates:
        if c.exists():
            return c.resolve()
    raise ScaffoldError(f"cannot find {what} (looked at {', '.join(str(c) for c in candidates)}); "
                        f"set {env}")


def c_header() -> Path:
    """proxy_wasm.h, the C header of the ABI."""
    return _from_install("WASMGATE_C_HEADER", ["filters/examples/c/proxy_wasm.h", "filters/c/proxy_wasm.h"],
                         "wasmgate's C header of the ABI (proxy_wasm.h)")


def sdk_path() -> Path:
    """The Rust SDK crate (filters/sdk)."""
    sdk = _from_install("WASMGATE_SDK", ["filters/sdk"], "wasmgate's Rust SDK (filters/sdk)")
    if not (sdk / "Cargo.toml").is_file():
        raise ScaffoldError(f"{sdk} has no Cargo.toml: not the Rust SDK; fix WASMGATE_SDK")
    return sdk


def unavailable(lang: str) -> str | None:
    """Why projects in `lang` cannot be built here, or None."""
    if lang == "rust":
        try:
            sdk_path()
        except ScaffoldError as e:
            return str(e)
        return None if os.access("/usr/bin/cargo", os.X_OK) else "no /usr/bin/cargo (apt install rustc cargo libstd-rust-dev-wasm32 lld)"
    if lang == "assemblyscript":
        return None if shutil.which("npm") else "no npm on PATH (install Node.js and npm)"
    if lang == "c":
        if not os.access(CLANG, os.X_OK):
            return f"no {CLANG} (apt install clang-14 lld-14 wasi-libc libclang-rt-14-dev-wasm32)"
        try:
            c_header()
        except ScaffoldError as e:
            return str(e)
        return None
    return f"unknown language {lang!r}"


def create(name: str, lang: str = "rust", directory: Path | None = None) -> Path:
    """Write the project; returns its directory. ScaffoldError says what is wrong."""
    if not _NAME.fullmatch(name):
        raise ScaffoldError(f"filter name {name!r}: use lower-case letters, digits, - and _, "
                            "starting with a letter")
    if lang not in LANGS:
        raise ScaffoldError(f"--lang {lang}: one of {', '.join(LANGS)}")
    why = unavailable(lang)
    if why:
        raise ScaffoldError(f"--lang {lang} cannot be built here: {why}")
    target = (directory or Path(name)).resolve()
    if target.exists() and any(target.iterdir()):
        raise ScaffoldError(f"{target} exists and is not empty")
    values = {**LANG_VALUES[lang], "name": name, "lib": name.replace("-", "_"), "dir": str(target)}
    if lang == "rust":
        values["sdk"] = str(sdk_path())
    if lang == "c":
        values["include"] = str(c_header().parent)
    for source in (TEMPLATES / "common", TEMPLATES / lang):
        for src in sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            rel = Path(*[_RENAMES.get(part, part) for part in src.relative_to(source).parts])
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(_fill(src.read_text(), values))
            if src.suffix == ".sh":
                dest.chmod(0o755)
    return target


def _fill(text: str, values: dict[str, str]) -> str:
    """Replace {{key}} placeholders (twice: a language's values may hold {{lib}})."""
    for _ in range(2):
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
    return text


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="wasmgate new",
                                description="Create a filter project that builds, and passes its tests.")
    p.add_argument("kind", choices=["filter"], help="what to create (a filter project)")
    p.add_argument("name", help="the filter's name (crate and .wasm name)")
    buildable = [lang for lang in LANGS if unavailable(lang) is None]
    p.add_argument("--lang", default="rust", choices=LANGS,
                   help=f"default: rust; buildable here: {', '.join(buildable) or 'none'}")
    p.add_argument("--dir", type=Path, help="where to create it (default: ./NAME)")
    args = p.parse_args(argv)
    try:
        target = create(args.name, args.lang, args.dir)
    except ScaffoldError as e:
        print(f"wasmgate new filter: {e}", file=sys.stderr)
        return 1
    print(f"created {target}\n  cd {target}\n  ./build.sh          # dist/*.wasm\n"
          "  python -m pytest    # builds when stale, then tests the real wasm\n"
          "  then add gateway-snippet.yaml's entries to your config.yaml")
    return 0
