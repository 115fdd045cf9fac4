"""`protocol: grpc` clusters of one config generation: what HostServices.grpc_call and
grpc_stream reach (filters' gRPC callouts).

The clients (gateway/grpc_client.py) and so grpcio are imported only when the config has a
gRPC cluster: a gateway without one does not pay for the import (nor for gRPC's threads).
"""
from __future__ import annotations

from abi.api import GrpcReply, GrpcStream, Headers, MetricSample

from .config import Cluster

UNAVAILABLE = 14


class GrpcClusters:
    """Every `protocol: grpc` cluster of one config generation, by name."""

    def __init__(self, clusters: tuple[Cluster, ...] = ()):
        self.clients = {}
        if clusters:
            from .grpc_client import GrpcClusterClient
            self.clients = {c.name: GrpcClusterClient(c) for c in clusters}

    def has(self, name: str) -> bool:
        return name in self.clients

    async def call(self, name: str, path: str, metadata: Headers, message: bytes,
                   timeout_s: float | None) -> GrpcReply:
        client = self.clients.get(name)
        if client is None:
            return GrpcReply(UNAVAILABLE, f'no grpc cluster named "{name}"')
        return await client.call(path, metadata, message, timeout_s)

    def stream(self, name: str, path: str, metadata: Headers) -> GrpcStream:
        return self.clients[name].stream(path, metadata)

    def samples(self) -> list[MetricSample]:
        return [MetricSample("wasmgate_grpc_callouts_total", "counter", float(n),
                             {"cluster": name, "code": code},
                             "Filters' gRPC calls and streams by how they ended (gRPC status).")
                for name, c in self.clients.items() for code, n in sorted(c.counts.items())]

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
