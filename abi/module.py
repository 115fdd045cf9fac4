"""Loading a filter's module: compile (disk-cached by the engine), ABI version, import check.

Mirrors cpp-host bytecode_util.cc (ABI marker) and wasm.cc (import registration): everything is
decided before instantiation so a user sees one clear error naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import capabilities
from .seam import FilterLoadError, FilterSpec
from .engine import Engine, EngineError, Module
from .enums import ABI_MARKERS
from .hostcalls import HOSTCALLS
from .wasi import WASI, WASI_MODULES


@dataclass(frozen=True)
class LoadedModule:
    path: Path
    module: Module
    abi_version: str                 # "0.1.0" | "0.2.0" | "0.2.1"
    exports: frozenset[str]          # exported function names

    @property
    def headers_take_eos(self) -> tuple[bool, bool]:
        """(request, response): whether the module's header callback declares
        `end_of_stream` — by the export's own arity, since 0.1.0 builds declare either."""
        return tuple(self.arity(n) == 3 if n in self.exports else True     # type: ignore[return-value]
                     for n in ("proxy_on_request_headers", "proxy_on_response_headers"))

    def arity(self, name: str) -> int:
        return len(self.module.exports[name].params)


def expected_signature(module: str, name: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(params, results) we implement for an import, or None when we do not know it."""
    if module == "env" and name in HOSTCALLS:
        return HOSTCALLS[name][1], HOSTCALLS[name][2]
    if module in WASI_MODULES and name in WASI:
        return WASI[name][1], WASI[name][2]
    return None


def load_module(engine: Engine, spec: FilterSpec) -> LoadedModule:
    path = Path(spec.wasm_path)
    try:
        wasm = path.read_bytes()
    except OSError as e:
        raise FilterLoadError(spec.name, f"cannot read {path}: {e.strerror or e}") from None
    try:
        module = engine.compile(wasm, path.name)
    except EngineError as e:
        raise FilterLoadError(spec.name, f"{path}: {e}") from None
    funcs = frozenset(n for n, exp in module.exports.items() if exp.kind == "func")
    version = next((v for marker, v in ABI_MARKERS.items() if marker in funcs), None)
    if version is None:
        raise FilterLoadError(spec.name, f"{path}: missing or unknown Proxy-Wasm ABI version "
                              "(no proxy_abi_version_0_2_1/0_2_0/0_1_0 export)")
    _check_imports(spec, path, module)
    _check_exports(spec, path, module, version)
    return LoadedModule(path, module, version, funcs)


_I = "i32"
# Callbacks we call: (params, results), as cpp-host's getFunction checks them.
CALLBACK_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_initialize": ((), ()),
    "_start": ((), ()),
    "proxy_on_memory_allocate": ((_I,), (_I,)),
    "malloc": ((_I,), (_I,)),
    "proxy_on_context_create": ((_I, _I), ()),
    "proxy_on_vm_start": ((_I, _I), (_I,)),
    "proxy_on_configure": ((_I, _I), (_I,)),
    "proxy_on_tick": ((_I,), ()),
    "proxy_on_queue_ready": ((_I, _I), ()),
    "proxy_on_request_headers": ((_I, _I, _I), (_I,)),
    "proxy_on_request_body": ((_I, _I, _I), (_I,)),
    "proxy_on_request_trailers": ((_I, _I), (_I,)),
    "proxy_on_response_headers": ((_I, _I, _I), (_I,)),
    "proxy_on_response_body": ((_I, _I, _I), (_I,)),
    "proxy_on_response_trailers": ((_I, _I), (_I,)),
    "proxy_on_http_call_response": ((_I, _I, _I, _I, _I), ()),
    "proxy_on_redis_call_response": ((_I, _I, _I, _I), ()),      # Higress
    "proxy_on_done": ((_I,), (_I,)),
    "proxy_on_log": ((_I,), ()),
    "proxy_on_delete": ((_I,), ()),
}
# Signatures some host accepted besides the one above, by ABI version. 0.1.0 header
# callbacks: (ctx, num_headers) as the spec and cpp-host have them, or (ctx, num_headers,
# end_of_stream) as TinyGo `-tags abi_010` and 2020-21 C++ SDK builds declare them and MOSN's
# proxy-wasm-go-host calls them. No other callback changed arity between versions (spec
# CHANGELOG), and 0.2.x hosts all call the 3-argument headers.
_V010_ALSO = {
    "proxy_on_request_headers": ((_I, _I), (_I,)),
    "proxy_on_response_headers": ((_I, _I), (_I,)),
}


def _check_exports(spec: FilterSpec, path: Path, module: Module, version: str) -> None:
    bad = []
    for name, want in CALLBACK_SIGNATURES.items():
        exp = module.exports.get(name)
        if exp is None or exp.kind != "func":
            continue
        accepted = [want]
        if version == "0.1.0" and name in _V010_ALSO:
            accepted.insert(0, _V010_ALSO[name])
        if (tuple(exp.params), tuple(exp.results)) not in accepted:
            bad.append(f"{name} is {_fmt(exp.params, exp.results)}, expected "
                       + " or ".join(_fmt(*a) for a in accepted))
    if bad:
        raise FilterLoadError(spec.name, f"{path}: exports with the wrong signature (ABI "
                              f"{version}): " + "; ".join(bad))


def _check_imports(spec: FilterSpec, path: Path, module: Module) -> None:
    unknown, mismatched = [], []
    for imp in module.imports:
        if imp.kind == "memory" and imp.module == "env":
            continue    # Emscripten builds may import their memory; the engine creates it, capped.
        want = expected_signature(imp.module, imp.name) if imp.kind == "func" else None
        if want is None:
            unknown.append(f"{imp.module}.{imp.name}" + ("" if imp.kind == "func" else f" ({imp.kind})"))
        elif (tuple(imp.params), tuple(imp.results)) != want:
            mismatched.append(f"{imp.module}.{imp.name} is {_fmt(imp.params, imp.results)}, "
                              f"expected {_fmt(*want)}")
    if unknown:
        raise FilterLoadError(spec.name, f"{path}: unknown imports: {', '.join(unknown)}")
    if mismatched:
        raise FilterLoadError(spec.name, f"{path}: imports with the wrong signature: "
                              + "; ".join(mismatched))
    if spec.strict_capabilities:
        denied = capabilities.denied(spec.capabilities)
        refused = sorted({f"{imp.module}.{imp.name} (capability {denied[imp.name]})" for imp in module.imports
                          if imp.kind == "func" and imp.name in denied
                          and (imp.module == "env") == imp.name.startswith("proxy_")})
        if refused:
            raise FilterLoadError(spec.name, f"{path}: imports functions its capabilities do not grant "
                                  f"(strict_capabilities): {', '.join(refused)}")


def _fmt(params, results) -> str:
    return f"({', '.join(params)}) -> ({', '.join(results)})"
