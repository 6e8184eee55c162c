"""Calls a KServe server with tritonclient.grpc, in its own process.

kserve and tritonclient.grpc cannot be imported in one process (duplicate `inference.*` protobuf
descriptors), so the tests run this script as a child. It reads JSON from stdin:

    {"url": "127.0.0.1:8081", "model": "reward",
     "calls": [{"op": "metadata"},
               {"op": "infer", "inputs": [{"name": ..., "datatype": ..., "shape": [...], "data": [...]}]}]}

BYTES data are base64 strings (nested to any depth); other data are numbers. It prints one JSON list
with a result per call: {"ok": true, ...} or {"ok": false, "status": "StatusCode.X", "message": ...}.
"""

from __future__ import annotations

import base64
import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def _array(spec: dict[str, Any]) -> np.ndarray:
    if spec["datatype"] == "BYTES":
        decode = np.vectorize(base64.b64decode, otypes=[object])
        return decode(np.array(spec["data"], dtype=object)).reshape(spec["shape"])
    return np.array(spec["data"], dtype=triton_to_np_dtype(spec["datatype"])).reshape(spec["shape"])


def _call(client: grpcclient.InferenceServerClient, model: str, call: dict[str, Any]) -> dict[str, Any]:
    try:
        if call["op"] == "metadata":
            metadata = client.get_model_metadata(model, as_json=True)
            return {"ok": True, "inputs": metadata["inputs"], "outputs": metadata["outputs"]}
        inputs = []
        for spec in call["inputs"]:
            infer_input = grpcclient.InferInput(spec["name"], spec["shape"], spec["datatype"])
            infer_input.set_data_from_numpy(_array(spec))
            inputs.append(infer_input)
        result = client.infer(model, inputs)
        response = result.get_response(as_json=True)
        return {"ok": True, "id": response["id"], "score": result.as_numpy("score").tolist()}
    except InferenceServerException as error:
        return {"ok": False, "status": error.status(), "message": error.message()}


def main() -> None:
    request = json.load(sys.stdin)
    client = grpcclient.InferenceServerClient(request["url"])
    print(json.dumps([_call(client, request["model"], call) for call in request["calls"]]))


if __name__ == "__main__":
    main()
