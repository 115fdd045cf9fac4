"""WASI preview1 for filters (reference §1.4, cpp-host FOR_ALL_WASI_FUNCTIONS).

Defined under both ``wasi_snapshot_preview1`` and ``wasi_unstable``. A filter gets: stdout and
stderr (into the gateway log, tagged with the filter), clocks, random bytes, the environment
its config grants. No args, no filesystem, no sockets. proc_exit ends the instance.
"""
from __future__ import annotations

import os
import struct
import sys
import time
from array import array
from operator import add
from typing import Callable

from .engine import HostTrap
from .enums import WasiErrno as E
from .limits import IOVEC_BATCH, MAX_LOG_BYTES
from .context import FilterView

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")
STDOUT, STDERR = 1, 2
MAX_RANDOM = 64 * 1024
_U32 = 0xFFFFFFFF
_SWAP = sys.byteorder != "little"      # iovec words are little-endian in guest memory


class ProcExit(HostTrap):
    def __init__(self, code: int):
        super().__init__(f"proc_exit({code})")
        self.code = code


def _gather(f: FilterView, iovs: int, n: int, cap: int) -> tuple[bytes, int]:
    """The first `cap` bytes an iovec list points at, and the total length it claims.

    The list may name the same guest bytes over and over, so the host copies at most `cap`
    bytes of data (and one batch of the list at a time) however much the guest claims. Every
    iovec is still bounds-checked: a bad one is FAULT, as in cpp-host."""
    parts: list[bytes] = []
    room = cap
    total = 0
    for first in range(0, n, IOVEC_BATCH):
        count = min(IOVEC_BATCH, n - first)
        words = array("I", f.read(iovs + 8 * first, 8 * count))
        if _SWAP:
            words.byteswap()
        ptrs, lens = words[0::2], words[1::2]
        f.check_out(0, max(map(add, ptrs, lens)))
        total += sum(lens)
        i = 0
        while room and i < count:
            take = min(lens[i], room)
            if take:
                parts.append(f.read(ptrs[i], take))
                room -= take
            i += 1
    return b"".join(parts), total


def fd_write(f, fd, iovs, iovs_len, ret_p):
    if fd not in (STDOUT, STDERR):
        return E.BADF
    data, total = _gather(f, iovs, iovs_len, MAX_LOG_BYTES)
    if total > _U32:
        return E.INVAL                  # as writev when the lengths overflow its result
    f.check_out(ret_p, 4)
    f.guest_stdio(fd, data, total)
    f.write_u32(ret_p, total)           # all of it "written": the rest of the line is dropped
    return E.SUCCESS


def fd_pwrite(f, fd, iovs, iovs_len, offset, ret_p):
    return fd_write(f, fd, iovs, iovs_len, ret_p)


def fd_read(f, fd, iovs, iovs_len, ret_p):
    return E.NOSYS


def fd_pread(f, fd, iovs, iovs_len, offset, ret_p):
    return E.NOSYS


def fd_seek(f, fd, offset, whence, ret_p):
    return E.SUCCESS if fd in (STDOUT, STDERR) else E.BADF


def fd_tell(f, fd, ret_p):
    if fd not in (STDOUT, STDERR):
        return E.BADF
    f.write_u64(ret_p, 0)
    return E.SUCCESS


def fd_close(f, fd):
    return E.SUCCESS


def fd_fdstat_get(f, fd, ret_p):
    if fd not in (STDOUT, STDERR):
        return E.BADF
    # fdstat: u8 filetype, u16 flags, u64 rights_base (FD_WRITE = 64), u64 rights_inheriting
    f.write(ret_p, struct.pack("<BxHxxxxQQ", 0, 0, 64, 0))
    return E.SUCCESS


def _stdio_ok(f, fd, *_):
    return E.SUCCESS if fd in (STDOUT, STDERR) else E.BADF


def _badf(f, *_):
    return E.BADF


def _nosys(f, *_):
    return E.NOSYS


def _notsup(f, *_):
    return E.NOTSUP


def _notcapable(f, *_):
    return E.NOTCAPABLE


def path_open(f, *_):
    return E.NOENT


def fd_readdir(f, *_):
    return E.NOTDIR


def _env_block(f) -> list[bytes]:
    return [f"{k}={v}".encode("utf-8", "surrogateescape") + b"\0" for k, v in f.spec.environment]


def environ_sizes_get(f, count_p, size_p):
    env = _env_block(f)
    f.check_out(size_p, 4)
    f.write_u32(count_p, len(env))
    f.write_u32(size_p, sum(len(e) for e in env))
    return E.SUCCESS


def environ_get(f, array_p, buf_p):
    env = _env_block(f)
    f.check_out(array_p, 4 * len(env))
    f.check_out(buf_p, sum(len(e) for e in env))
    pos = buf_p
    for i, entry in enumerate(env):
        f.write_u32(array_p + 4 * i, pos)
        f.write(pos, entry)
        pos += len(entry)
    return E.SUCCESS


def args_sizes_get(f, count_p, size_p):
    f.check_out(size_p, 4)
    f.write_u32(count_p, 0)
    f.write_u32(size_p, 0)
    return E.SUCCESS


def args_get(f, array_p, buf_p):
    return E.SUCCESS


def clock_time_get(f, clock_id, precision, ret_p):
    if clock_id == 0:
        f.write_u64(ret_p, time.time_ns())
    elif clock_id == 1:
        f.write_u64(ret_p, time.monotonic_ns())
    else:
        return E.NOTSUP
    return E.SUCCESS


def clock_res_get(f, clock_id, ret_p):
    if clock_id > 1:
        return E.NOTSUP
    f.write_u64(ret_p, 1)
    return E.SUCCESS


def random_get(f, buf, length):
    if length > MAX_RANDOM:
        return E.INVAL
    f.check_out(buf, length)
    f.write(buf, os.urandom(length))
    return E.SUCCESS


def poll_oneoff(f, in_p, out_p, n, ret_p):
    f.write_u32(ret_p, 0)               # Go's runtime needs SUCCESS here (cpp-host)
    return E.SUCCESS


def sched_yield(f):
    return E.SUCCESS


def proc_exit(f, code):
    if code == 0 and f.starting:
        # A WASI command (TinyGo >= 0.35) exits after main at the end of _start. cpp-host's
        # proc_exit returns to the guest, so the instance lives on there: do the same.
        return None
    raise ProcExit(code)


def proc_raise(f, sig):
    return E.NOSYS


_I32, _I64 = "i32", "i64"


def _s(*params: str, result: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(params), ((_I32,) if result else ())


def _n(n: int) -> tuple[str, ...]:
    return (_I32,) * n


# name → (adapter, params, results), the cpp-host set plus the rest of preview1 as refusals.
WASI: dict[str, tuple[Callable, tuple[str, ...], tuple[str, ...]]] = {
    "fd_write": (fd_write, *_s(*_n(4))),
    "fd_pwrite": (fd_pwrite, *_s(_I32, _I32, _I32, _I64, _I32)),
    "fd_read": (fd_read, *_s(*_n(4))),
    "fd_pread": (fd_pread, *_s(_I32, _I32, _I32, _I64, _I32)),
    "fd_seek": (fd_seek, *_s(_I32, _I64, _I32, _I32)),
    "fd_tell": (fd_tell, *_s(*_n(2))),
    "fd_close": (fd_close, *_s(*_n(1))),
    "fd_fdstat_get": (fd_fdstat_get, *_s(*_n(2))),
    "fd_fdstat_set_flags": (_nosys, *_s(*_n(2))),
    "fd_fdstat_set_rights": (_stdio_ok, *_s(_I32, _I64, _I64)),
    "fd_advise": (_stdio_ok, *_s(_I32, _I64, _I64, _I32)),
    "fd_allocate": (_stdio_ok, *_s(_I32, _I64, _I64)),
    "fd_datasync": (_stdio_ok, *_s(*_n(1))),
    "fd_sync": (_stdio_ok, *_s(*_n(1))),
    "fd_filestat_get": (_badf, *_s(*_n(2))),
    "fd_filestat_set_size": (_stdio_ok, *_s(_I32, _I64)),
    "fd_filestat_set_times": (_stdio_ok, *_s(_I32, _I64, _I64, _I32)),
    "fd_prestat_get": (_badf, *_s(*_n(2))),
    "fd_prestat_dir_name": (_nosys, *_s(*_n(3))),
    "fd_readdir": (fd_readdir, *_s(_I32, _I32, _I32, _I64, _I32)),
    "fd_renumber": (_notsup, *_s(*_n(2))),
    "path_open": (path_open, *_s(_I32, _I32, _I32, _I32, _I32, _I64, _I64, _I32, _I32)),
    "path_filestat_get": (_notsup, *_s(*_n(5))),
    "path_create_directory": (_notcapable, *_s(*_n(3))),
    "path_filestat_set_times": (_notcapable, *_s(_I32, _I32, _I32, _I32, _I64, _I64, _I32)),
    "path_link": (_notcapable, *_s(*_n(7))),
    "path_readlink": (_notcapable, *_s(*_n(6))),
    "path_remove_directory": (_notcapable, *_s(*_n(3))),
    "path_rename": (_notcapable, *_s(*_n(6))),
    "path_symlink": (_notcapable, *_s(*_n(5))),
    "path_unlink_file": (_notcapable, *_s(*_n(3))),
    "environ_get": (environ_get, *_s(*_n(2))),
    "environ_sizes_get": (environ_sizes_get, *_s(*_n(2))),
    "args_get": (args_get, *_s(*_n(2))),
    "args_sizes_get": (args_sizes_get, *_s(*_n(2))),
    "clock_time_get": (clock_time_get, *_s(_I32, _I64, _I32)),
    "clock_res_get": (clock_res_get, *_s(*_n(2))),
    "random_get": (random_get, *_s(*_n(2))),
    "poll_oneoff": (poll_oneoff, *_s(*_n(4))),
    "sched_yield": (sched_yield, *_s()),
    "proc_exit": (proc_exit, *_s(_I32, result=False)),
    "proc_raise": (proc_raise, *_s(*_n(1))),
    "sock_accept": (_notcapable, *_s(*_n(3))),
    "sock_recv": (_notcapable, *_s(*_n(6))),
    "sock_send": (_notcapable, *_s(*_n(5))),
    "sock_shutdown": (_notcapable, *_s(*_n(2))),
}
