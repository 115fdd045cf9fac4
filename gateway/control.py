"""What the control plane (admin endpoints, reload, worker metrics) reads and sets of the running
gateway (server.Gateway).

It sits below admin.py, reload.py and worker_metrics.py, so they depend on this view instead of
on server.py, which imports them: the server is on top, its control plane below it.
"""
from __future__ import annotations

from typing import Protocol

from .audit import AuditLog
from .config import Config
from .metrics import Metrics
from .proxy import Generation


class ControlledGateway(Protocol):
    """server.Gateway as the control plane sees it. Set later, read with getattr: ``ops`` and
    ``reload_broadcast`` (gateway/workers.py), ``reload_state`` (reload.state_of),
    ``filter_host_factory`` (Gateway.start)."""
    config: Config
    metrics: Metrics
    audit: AuditLog
    generation: Generation          # a reload swaps it
    draining: bool
    ready: bool
    listener_ports: dict[str, int]
    admin_port: int | None
