"""The Open Inference Protocol (KServe v2, as Triton and PyTriton speak it): tensors in and out of HTTP bodies.

A request body is JSON, or - with the binary tensor extension - JSON followed by raw tensor bytes, the
JSON's length given by the ``Inference-Header-Content-Length`` header and each binary input's size by
its ``binary_data_size`` parameter. Inputs carry ``name``, ``shape``, ``datatype`` and either ``data``
(a flat or nested list, row-major) or binary bytes (little-endian, row-major). Responses mirror that:
JSON ``data``, or binary bytes when the request asked for them (``binary_data_output`` or an output's
``binary_data`` parameter).

Every malformed request raises :class:`RequestError` with the HTTP status and a message that names what
is wrong; nothing here knows about models.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES = {"INT64": np.dtype("<i8"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
             "BOOL": np.dtype("?")}


class RequestError(Exception):
    """A request the server cannot serve, with the HTTP status to answer it with (and headers, if any)."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.headers = headers


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: dict[str, np.ndarray]
    binary_output: bool


MAX_DIMENSIONS = 8  # a tensor's rank; numpy itself stops at 64


def parse_json(raw: bytes, what: str = "the request body") -> Any:
    """``raw`` decoded as JSON; a fault (bad bytes, bad JSON, nesting past Python's recursion limit) is a 400."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"{what} is not valid JSON ({error})") from None
    except RecursionError:
        raise RequestError(400, f"{what} is nested too deeply to be a request") from None


def parameters_of(owner: Any, where: str) -> dict:
    """The ``parameters`` object of ``owner`` (a request, an input or an output spec); absent is empty."""
    parameters = owner.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(400, f"{where}.parameters must be an object, got {type(parameters).__name__}")
    return parameters


def _flatten(data: list, shape: list[int], name: str) -> list:
    """The values of ``data`` (flat, or nested as ``shape``, row-major), without recursion: a list nested
    deeper than the tensor's rank, or ragged rows, are refused rather than flattened into a wrong tensor."""
    if not any(isinstance(item, list) for item in data):
        return data
    level = [data]
    for depth, size in enumerate(shape):
        bad = next((row for row in level if not isinstance(row, list) or len(row) != size), None)
        if bad is not None:
            found = f"a row of {len(bad)}" if isinstance(bad, list) else "a single value"
            raise RequestError(400, f"input '{name}': its nested 'data' values do not fill shape {shape} (at depth "
                                    f"{depth}: {found} where {size} are needed)")
        level = [item for row in level for item in row]
    if any(isinstance(item, list) for item in level):
        raise RequestError(400, f"input '{name}': 'data' is nested deeper than its shape {shape}")
    return level


def _array(spec: Any, binary: Optional[bytes], index: int) -> tuple[str, np.ndarray]:
    if not isinstance(spec, dict):
        raise RequestError(400, f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = spec.get("name")
    if not isinstance(name, str):
        raise RequestError(400, f"inputs[{index}] has no 'name'")
    shape, datatype = spec.get("shape"), spec.get("datatype")
    if not isinstance(shape, list) or len(shape) > MAX_DIMENSIONS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise RequestError(400, f"input '{name}': 'shape' must be a list of at most {MAX_DIMENSIONS} non-negative "
                                f"integers, got {str(shape)[:200]}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(400, f"input '{name}': datatype {str(datatype)[:50]!r} is not one of {', '.join(DATATYPES)}")
    count = math.prod(shape)  # Python integers: a product of huge dimensions cannot wrap around
    dtype = DATATYPES[datatype]
    if binary is not None:
        if len(binary) != count * dtype.itemsize:
            raise RequestError(400, f"input '{name}': {len(binary)} binary bytes do not hold shape {shape} of "
                                    f"{datatype} ({count * dtype.itemsize} bytes)")
        return name, np.frombuffer(binary, dtype=dtype).reshape(shape)
    data = spec.get("data")
    if not isinstance(data, list):
        raise RequestError(400, f"input '{name}' has neither 'data' nor binary data")
    flat = _flatten(data, shape, name)
    if len(flat) != count:
        raise RequestError(400, f"input '{name}': {len(flat)} values do not fill shape {shape}")
    try:
        array = np.asarray(flat, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise RequestError(400, f"input '{name}': its data are not all {datatype} values") from None
    if datatype.startswith("INT") and not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise RequestError(400, f"input '{name}': its data are not all integers ({datatype})")
    return name, array.reshape(shape)


def parse_infer_request(body: bytes, header_length: Optional[str]) -> InferRequest:
    """Decode a KServe v2 inference request (JSON, or JSON + binary tensors)."""
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise RequestError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < json_length <= len(body):
            raise RequestError(400, f"{HEADER_LENGTH}={json_length} does not fit the {len(body)}-byte body")
        header, binary = body[:json_length], body[json_length:]
    else:
        header, binary = body, b""
    payload = parse_json(header)
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise RequestError(400, "the request must be a JSON object with an 'inputs' list")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for index, spec in enumerate(payload["inputs"]):
        size = parameters_of(spec, f"inputs[{index}]").get("binary_data_size") if isinstance(spec, dict) else None
        chunk = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise RequestError(400, f"inputs[{index}]: binary_data_size={size!r} runs past the body's "
                                        f"{len(binary)} binary bytes")
            chunk, offset = binary[offset:offset + size], offset + size
        name, array = _array(spec, chunk, index)
        if name in inputs:
            raise RequestError(400, f"input '{name}' is given twice")
        inputs[name] = array
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset} binary bytes follow the inputs unused")
    parameters = parameters_of(payload, "the request")
    outputs = payload.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(output, dict) for output in outputs):
        raise RequestError(400, "'outputs' must be a list of objects")
    binary_output = bool(parameters.get("binary_data_output")) or any(
        parameters_of(output, f"outputs[{index}]").get("binary_data") for index, output in enumerate(outputs))
    request_id = payload.get("id")
    return InferRequest(request_id if isinstance(request_id, str) else None, inputs, binary_output)


_NAMES = {np.dtype("<f4"): "FP32", np.dtype("<f8"): "FP64", np.dtype("<i8"): "INT64", np.dtype("<i4"): "INT32",
          np.dtype("?"): "BOOL"}


def _encode(payload: dict, key: str, tensors: dict[str, np.ndarray], binary: bool) -> tuple[bytes, dict[str, str]]:
    """``payload`` with ``tensors`` under ``key``, framed as JSON or JSON + binary tensor bytes."""
    specs, chunks = [], []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        spec = {"name": name, "shape": list(array.shape), "datatype": _NAMES[little.dtype]}
        if binary:
            chunks.append(little.tobytes())
            spec["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            spec["data"] = little.reshape(-1).tolist()
        specs.append(spec)
    header = json.dumps({**payload, key: specs}).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def infer_response(model_name: str, outputs: dict[str, np.ndarray], request_id: Optional[str],
                   binary: bool) -> tuple[bytes, dict[str, str]]:
    """``(body, headers)`` of a KServe v2 inference response."""
    payload = {"model_name": model_name} | ({"id": request_id} if request_id is not None else {})
    return _encode(payload, "outputs", outputs, binary)


def infer_request_body(inputs: dict[str, np.ndarray], request_id: Optional[str] = None,
                       binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """``(body, headers)`` of a KServe v2 inference request, as tritonclient frames it for :class:`RemoteGVM` (for a
    client without tritonclient: benchmarks/gvm_server_throughput.py)."""
    payload = {"parameters": {"binary_data_output": binary}} | ({"id": request_id} if request_id is not None else {})
    return _encode(payload, "inputs", inputs, binary)


def parse_infer_response(body: bytes, header_length: Optional[str]) -> dict[str, np.ndarray]:
    """The output tensors of a KServe v2 inference response (the client side of :func:`infer_response`)."""
    json_length = int(header_length) if header_length else len(body)
    payload = json.loads(body[:json_length])
    binary = body[json_length:]
    outputs, offset = {}, 0
    for spec in payload["outputs"]:
        dtype = DATATYPES[spec["datatype"]]
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype).reshape(spec["shape"])
            offset += size
        else:
            array = np.asarray(spec["data"], dtype=dtype).reshape(spec["shape"])
        outputs[spec["name"]] = array
    return outputs
