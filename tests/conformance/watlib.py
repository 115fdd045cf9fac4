"""Expand the two source macros used by the conformance WAT modules and build them.

  $S"text"       -> (i32.const ptr) (i32.const len)   bytes placed in a data segment
  $M"k=v|k2=v2"  -> (i32.const ptr) (i32.const len)   a §4.1 serialized map ($M"" = 4 zero bytes)

String escapes follow WAT: \\hh (hex byte), \\n, \\t, \\\\, \\", \\'.
The data segment replaces the ``;;@DATA`` line and starts at DATA_BASE.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import wasmtime

WAT_DIR = Path(__file__).resolve().parent / "wat"
DATA_BASE = 8192
DATA_LIMIT = 16384

_LIT = r'"((?:[^"\\]|\\.)*)"'


def _unescape(lit: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(lit):
        c = lit[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        nxt = lit[i + 1]
        if nxt in "0123456789abcdefABCDEF":
            out.append(int(lit[i + 1:i + 3], 16))
            i += 3
        else:
            out += {"n": b"\n", "t": b"\t", "\\": b"\\", '"': b'"', "'": b"'"}[nxt]
            i += 2
    return bytes(out)


def serialize_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """§4.1: u32 N, N x (u32 klen, u32 vlen), N x (key \\0 value \\0)."""
    out = struct.pack("<I", len(pairs))
    for k, v in pairs:
        out += struct.pack("<II", len(k), len(v))
    for k, v in pairs:
        out += k + b"\x00" + v + b"\x00"
    return out


def _escape(data: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\{b:02x}" for b in data)


def expand(src: str) -> str:
    blob = bytearray()
    seen: dict[bytes, int] = {}

    def intern(data: bytes) -> str:
        if data not in seen:
            seen[data] = DATA_BASE + len(blob)
            blob.extend(data)
        return f"(i32.const {seen[data]}) (i32.const {len(data)})"

    def s_repl(m: re.Match) -> str:
        return intern(_unescape(m.group(1)))

    def m_repl(m: re.Match) -> str:
        text = _unescape(m.group(1)).decode()
        pairs = []
        for item in text.split("|") if text else []:
            k, v = item[:1] + item[1:].split("=", 1)[0], item[1:].split("=", 1)[1]
            pairs.append((k.encode(), v.encode()))
        return intern(serialize_map(pairs))

    src = re.sub(r"\$S" + _LIT, s_repl, src)
    src = re.sub(r"\$M" + _LIT, m_repl, src)
    if DATA_BASE + len(blob) > DATA_LIMIT:
        raise ValueError("constant strings overflow the data area")
    if blob:
        src = src.replace(";;@DATA", f'(data (i32.const {DATA_BASE}) "{_escape(bytes(blob))}")')
    return src


def wat_text(name: str) -> str:
    return expand((WAT_DIR / name).read_text())


def build(name: str, out_dir: Path, binary: bool = False) -> Path:
    """Write the expanded module to out_dir as .wat (or compiled .wasm) and return the path."""
    text = wat_text(name)
    stem = Path(name).stem
    if binary:
        path = out_dir / f"{stem}.wasm"
        path.write_bytes(wasmtime.wat2wasm(text))
    else:
        path = out_dir / f"{stem}.wat"
        path.write_text(text)
    return path
