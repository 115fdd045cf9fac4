"""Numeric enums of the Proxy-Wasm ABI (reference §3), as plain ints for the hot path."""
from __future__ import annotations


class Status:
    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    BAD_EXPRESSION = 5
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    RESULT_MISMATCH = 9
    INTERNAL_FAILURE = 10
    BROKEN_CONNECTION = 11
    UNIMPLEMENTED = 12


class LogLevel:
    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class Action:
    CONTINUE = 0
    PAUSE = 1


class BufferType:
    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_RECEIVE_BUFFER = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    CALL_DATA = 8
    REDIS_CALL_RESPONSE = 9       # Higress extension: the raw RESP reply of a Redis call
    MAX = 9


class MapType:
    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_RECEIVE_INITIAL_METADATA = 4
    GRPC_RECEIVE_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7
    MAX = 7


class StreamType:
    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType:
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2


class WasiErrno:
    SUCCESS = 0
    BADF = 8
    NOTDIR = 20
    FAULT = 21
    INVAL = 28
    NOENT = 44
    NOSYS = 52
    NOTSUP = 58
    NOTCAPABLE = 76


ABI_MARKERS = {
    "proxy_abi_version_0_2_1": "0.2.1",
    "proxy_abi_version_0_2_0": "0.2.0",
    "proxy_abi_version_0_1_0": "0.1.0",
}
