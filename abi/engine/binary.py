"""Just enough of the wasm binary format to read a module's signatures: imports and exports
with value types, function names for backtraces, whether it has a start function.

Why not wasmtime-py's ImportType/ExportType: see ``_Reader``. Cold path (once per compile).
"""
from __future__ import annotations

from dataclasses import dataclass

import wasmtime as wt

from .errors import EngineError


@dataclass(frozen=True)
class Import:
    module: str
    name: str
    kind: str                       # "func" | "memory" | "table" | "global"
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()
    # memory imports: (minimum, maximum or None) in 64 KiB pages; flags "shared", "i64"
    limits: tuple[int, int | None] | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Export:
    kind: str
    params: tuple[str, ...] = ()
    results: tuple[str, ...] = ()


def _to_binary(wasm: bytes) -> bytes:
    if wasm.startswith(b"\0asm"):
        return wasm
    try:
        return bytes(wt.wat2wasm(wasm.decode("utf-8")))
    except (wt.WasmtimeError, UnicodeDecodeError) as e:
        raise EngineError(f"invalid wasm module: {e}") from None


class _Reader:
    """Just enough of the wasm binary format to read signatures of imports and exports.

    Why not wasmtime-py's ImportType/ExportType: asking it for a v128 or GC reference value
    type calls ``wasm_valtype_kind``, which aborts the whole process. The module is already
    validated by wasmtime when this runs, so only the unsupported-but-valid cases matter.
    """

    _VALTYPES = {0x7F: "i32", 0x7E: "i64", 0x7D: "f32", 0x7C: "f64", 0x7B: "v128",
                 0x70: "funcref", 0x6F: "externref"}

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def byte(self) -> int:
        b = self.data[self.pos]
        self.pos += 1
        return b

    def leb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    def name(self) -> str:
        n = self.leb()
        self.pos += n
        return self.data[self.pos - n:self.pos].decode("utf-8", "replace")

    def valtype(self) -> str:
        b = self.byte()
        if b in self._VALTYPES:
            return self._VALTYPES[b]
        if b in (0x63, 0x64):               # (ref null? heaptype): typed function references
            self.leb()
            return "ref"
        raise EngineError(f"unsupported wasm value type 0x{b:02x}")

    def limits(self) -> tuple[int, int | None, int]:
        """(minimum, maximum or None, flags byte)."""
        flags = self.byte()
        minimum = self.leb()
        maximum = self.leb() if flags & 0x01 else None
        if flags & 0x08:                    # custom-page-sizes: page size log2
            self.leb()
        return minimum, maximum, flags


_Sig = tuple[tuple[str, ...], tuple[str, ...]]


def _parse_signatures(binary: bytes) -> tuple[list[Import], dict[str, Export], dict[int, str],
                                               bool]:
    """Imports and exports with value types, function index -> export name (so backtraces
    of stripped modules still name ``proxy_on_request_headers``), and whether the module has
    a start function."""
    types: list[_Sig] = []
    imports: list[Import] = []
    func_types: list[int] = []              # type index per function index
    exports: dict[str, Export] = {}
    names: dict[int, str] = {}
    has_start = False
    r = _Reader(binary, 8)
    try:
        while r.pos < len(binary):
            section, size = r.byte(), r.leb()
            end = r.pos + size
            if section == 1:
                types = [_functype(r) for _ in range(r.leb())]
            elif section == 2:
                for _ in range(r.leb()):
                    imports.append(_import(r, types, func_types))
            elif section == 3:
                func_types += [r.leb() for _ in range(r.leb())]
            elif section == 7:
                for _ in range(r.leb()):
                    name, kind, index = r.name(), r.byte(), r.leb()
                    if kind == 0:
                        exports[name] = Export("func", *types[func_types[index]])
                        names.setdefault(index, name)
                    else:
                        exports[name] = Export(_EXTERN_KINDS.get(kind, "unknown"))
            elif section == 8:
                has_start = True
            r.pos = end
    except (IndexError, ValueError) as e:
        raise EngineError(f"cannot read the module's imports/exports: {e}") from None
    return imports, exports, names, has_start


_EXTERN_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}


def _functype(r: _Reader) -> _Sig:
    form = r.byte()
    if form != 0x60:
        raise EngineError("unsupported wasm type definition (GC proposal)")
    params = tuple(r.valtype() for _ in range(r.leb()))
    results = tuple(r.valtype() for _ in range(r.leb()))
    return params, results


def _import(r: _Reader, types: list[_Sig], func_types: list[int]) -> Import:
    module, name, kind = r.name(), r.name(), r.byte()
    if kind == 0:
        index = r.leb()
        func_types.append(index)
        return Import(module, name, "func", *types[index])
    if kind == 1:
        r.valtype()
        r.limits()
    elif kind == 2:
        minimum, maximum, flags = r.limits()
        odd = tuple(f for bit, f in ((0x02, "shared"), (0x04, "i64"), (0x08, "page-size"))
                    if flags & bit)
        return Import(module, name, "memory", limits=(minimum, maximum), flags=odd)
    elif kind == 3:
        r.valtype()
        r.byte()
    elif kind == 4:
        r.byte()
        r.leb()                         # a tag's type index
    return Import(module, name, _EXTERN_KINDS.get(kind, "unknown"))


def _describe(imp: Import) -> str:
    if imp.kind == "func":
        return f"func ({', '.join(imp.params)}) -> ({', '.join(imp.results)})"
    if imp.kind == "memory" and imp.limits is not None:
        lo, hi = imp.limits
        extra = "".join(f" {f}" for f in imp.flags)
        return f"memory {lo}..{'' if hi is None else hi} pages{extra}"
    return imp.kind
