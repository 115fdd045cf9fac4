"""route_metadata / cluster_metadata / node properties in Envoy's encoding (abi/metadata.py).

Leaves and maps are checked byte for byte against §4.1/§4.3; whole messages are decoded with
the protobuf library against Envoy's message shapes (Metadata, Node), so the hand-written
encoder is checked by an independent decoder.
"""
from __future__ import annotations

import struct
from types import SimpleNamespace

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory, struct_pb2

from abi.api import NodeInfo, StreamInfo
from abi.pairs import deserialize
from abi.properties import PropertySource, RootFacts, get_property

ROUTE_MD = {"policy": {"require-header": "x-tenant", "max": 3.0, "strict": True,
                       "tiers": ["gold", "silver"], "limits": {"rps": 10.0, "name": "café"}},
            "Other.NS": {"Key": "v"}}
CLUSTER_MD = {"envoy.lb": {"canary": False}}
NODE = NodeInfo(id="gw-7", cluster="edge", metadata={"ISTIO_VERSION": "1.22", "labels": {"app": "gw"}})


def _info(**kw) -> StreamInfo:
    return StreamInfo(request_id="r", route_name="api", cluster_name="backend", client_addr=("1.2.3.4", 5),
                      local_addr=("127.0.0.1", 8080), connection_id=1, **kw)


def _get(src: PropertySource, dotted: str) -> bytes | None:
    return get_property(src, dotted.replace(".", "\0").encode())


def _stream_src(node: NodeInfo | None = NODE) -> PropertySource:
    owner = SimpleNamespace(services=SimpleNamespace(node=node))
    facts = RootFacts(info=_info(route_metadata=ROUTE_MD, cluster_metadata=CLUSTER_MD))
    return PropertySource("p", facts, owner=owner)


def test_leaves_as_envoy_serializes_them():
    src = _stream_src()
    assert _get(src, "route_metadata.filter_metadata.policy.require-header") == b"x-tenant"
    assert _get(src, "route_metadata.filter_metadata.policy.max") == struct.pack("<d", 3.0)   # Struct numbers: doubles
    assert _get(src, "route_metadata.filter_metadata.policy.strict") == b"\x01"
    assert _get(src, "route_metadata.filter_metadata.policy.limits.name") == "café".encode("utf-8")
    assert _get(src, "route_metadata.filter_metadata.policy.tiers.1") == b"silver"
    assert _get(src, "cluster_metadata.filter_metadata.envoy.lb.canary") is None     # "." splits: no such ns
    assert get_property(src, b"cluster_metadata\0filter_metadata\0envoy.lb\0canary") == b"\x00"
    assert _get(src, "xds.route_metadata.filter_metadata.Other.NS.Key") is None
    assert get_property(src, b"xds\0route_metadata\0filter_metadata\0Other.NS\0Key") == b"v"
    assert _get(src, "node.id") == b"gw-7"
    assert _get(src, "node.cluster") == b"edge"
    assert _get(src, "node.metadata.ISTIO_VERSION") == b"1.22"
    assert _get(src, "xds.node.metadata.labels.app") == b"gw"


def test_not_found_and_case_sensitive_keys():
    src = _stream_src()
    assert _get(src, "route_metadata.filter_metadata.missing") is None
    assert _get(src, "route_metadata.filter_metadata.policy.MAX") is None       # Struct keys are exact
    assert _get(src, "route_metadata.filter_metadata.policy.tiers.2") is None
    assert _get(src, "route_metadata.filter_metadata.policy.max.deeper") is None
    assert _get(src, "route_metadata.other_field") is None
    assert _get(src, "node.user_agent_name") is None
    # No stream (a root context): no route, so no route/cluster metadata; the node is there.
    root = PropertySource("p", RootFacts(), owner=SimpleNamespace(services=SimpleNamespace(node=NODE)))
    assert _get(root, "route_metadata") is None
    assert _get(root, "cluster_metadata.filter_metadata") is None
    assert _get(root, "node.id") == b"gw-7"


def test_maps_and_lists_as_pairs():
    src = _stream_src()
    ns = deserialize(_get(src, "route_metadata.filter_metadata.policy"))
    assert [k for k, _ in ns] == [b"require-header", b"max", b"strict", b"tiers", b"limits"]
    d = dict(ns)
    assert d[b"max"] == struct.pack("<d", 3.0)
    assert deserialize(d[b"tiers"]) == [(b"gold", b""), (b"silver", b"")]       # list: items as keys
    assert deserialize(d[b"limits"]) == [(b"rps", struct.pack("<d", 10.0)), (b"name", "café".encode())]
    top = dict(deserialize(_get(src, "route_metadata.filter_metadata")))
    assert set(top) == {b"policy", b"Other.NS"} and deserialize(top[b"Other.NS"]) == [(b"Key", b"v")]
    assert dict(deserialize(_get(src, "node.metadata")))[b"ISTIO_VERSION"] == b"1.22"


def _envoy_messages():
    """Metadata and Node with Envoy's field numbers, built at run time (no generated code)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(descriptor_pb2.FileDescriptorProto.FromString(
        struct_pb2.DESCRIPTOR.serialized_pb).SerializeToString())
    f = descriptor_pb2.FileDescriptorProto(name="core.proto", package="envoy.config.core.v3", syntax="proto3",
                                           dependency=["google/protobuf/struct.proto"])
    md = f.message_type.add(name="Metadata")
    entry = md.nested_type.add(name="FilterMetadataEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=11, label=1, type_name=".google.protobuf.Struct")
    md.field.add(name="filter_metadata", number=1, type=11, label=3,
                 type_name=".envoy.config.core.v3.Metadata.FilterMetadataEntry")
    node = f.message_type.add(name="Node")
    node.field.add(name="id", number=1, type=9, label=1)
    node.field.add(name="cluster", number=2, type=9, label=1)
    node.field.add(name="metadata", number=3, type=11, label=1, type_name=".google.protobuf.Struct")
    pool.Add(f)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("envoy.config.core.v3.Metadata")),
            get(pool.FindMessageTypeByName("envoy.config.core.v3.Node")))


def test_messages_are_protobuf_bytes():
    Metadata, Node = _envoy_messages()
    src = _stream_src()
    md = Metadata.FromString(_get(src, "route_metadata"))
    assert json_format.MessageToDict(md)["filterMetadata"] == ROUTE_MD
    assert json_format.MessageToDict(Metadata.FromString(_get(src, "xds.cluster_metadata"))) == \
        {"filterMetadata": CLUSTER_MD}
    node = Node.FromString(_get(src, "node"))
    assert (node.id, node.cluster) == ("gw-7", "edge")
    assert json_format.MessageToDict(node.metadata) == NODE.metadata
    # Envoy has a node and route metadata even when nothing was configured: empty messages.
    empty = _stream_src(node=None)
    empty.facts.info.route_metadata = None
    assert _get(empty, "node") == b"" and _get(empty, "node.id") == b""
    assert _get(empty, "route_metadata") == b""
    assert _get(empty, "route_metadata.filter_metadata") == b""        # an empty map
