"""What a crossing can raise: compile/link failures, guest traps, host-requested traps, bad
guest pointers."""
from __future__ import annotations


class EngineError(Exception):
    """Compile, link or instantiate failure; the message is meant for users."""


class Trap(Exception):
    """A guest call ended abnormally."""

    def __init__(self, kind: str, message: str, backtrace: list[str] | None = None):
        super().__init__(f"{kind}: {message}")
        self.kind = kind                  # "trap" | "deadline" | "exit" | "host"
        self.message = message
        self.backtrace = backtrace or []  # innermost first


class HostTrap(Exception):
    """Raised by a host function to trap the guest on purpose (proc_exit, fatal misuse)."""


class MemoryAccessError(Exception):
    """A (ptr, len) pair outside linear memory."""
