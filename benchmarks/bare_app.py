"""The baseline of issue 26: the least a user could write to serve a bundle's all-members graph over the Open
Inference Protocol with Starlette and uvicorn: one bare onnxruntime session, JSON tensors in and out, nothing else
(no budgets, no faults, no batching, no checks on the input beyond what numpy raises).

    python benchmarks/bare_app.py BUNDLE [--port 0] [--port-file FILE]

It answers what perf_analyzer asks (model metadata, model config, infer) with the same probabilities as `edgens
serve` at full budget: the softmax of the mean over members of the largest prefix stack's logits (a checked graph's
check row and columns are sliced off). The model is named after the bundle's directory, as `edgens serve` names it.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app(bundle: Path) -> Starlette:
    manifest = json.loads((bundle / "manifest.json").read_text())
    stack = max(manifest["stacks"], key=lambda s: len(s["members"]) if s["role"] != "specialist" else 0)
    members, classes = len(stack["members"]), manifest["n_outputs"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(bundle / stack["file"]), options, providers=["CPUExecutionProvider"])
    mean, std = manifest["preprocessing"]["mean"][0], manifest["preprocessing"]["std"][0]
    name, shape = bundle.resolve().name, manifest["input"]["shape"]
    metadata = {"name": name, "versions": ["1"], "platform": "onnxruntime",
                "inputs": [{"name": "x", "datatype": "UINT8", "shape": [-1, *shape]}],
                "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, classes]}]}
    config = {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": 64,
              "input": [{"name": "x", "data_type": "TYPE_UINT8", "dims": shape}],
              "output": [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [classes]}]}

    async def infer(request: Request) -> Response:
        body = json.loads(await request.body())
        tensor = body["inputs"][0]
        x = (np.asarray(tensor["data"], np.float32).reshape(tensor["shape"]) - mean) / std
        eta = session.run([stack["output_name"]], {stack["input_name"]: x})[0][:members, :, :classes]
        logits = eta.mean(axis=0)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return JSONResponse({"model_name": name, "outputs": [{"name": "probabilities", "datatype": "FP32",
                                                               "shape": list(p.shape), "data": p.ravel().tolist()}]})

    return Starlette(routes=[Route("/v2", lambda r: JSONResponse({"name": "bare", "version": "0", "extensions": []})),
                             Route("/v2/models/{model}", lambda r: JSONResponse(metadata)),
                             Route("/v2/models/{model}/config", lambda r: JSONResponse(config)),
                             Route("/v2/models/{model}/infer", infer, methods=["POST"])])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="where to write the port once listening")
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # IPPROTO_TCP: asyncio sets NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(2048)
    server = uvicorn.Server(uvicorn.Config(create_app(args.bundle), log_config=None, access_log=False,
                                           lifespan="off"))
    if args.port_file is not None:
        original = server.startup

        async def startup(sockets=None):
            await original(sockets)
            partial = args.port_file.with_name(args.port_file.name + ".partial")
            partial.write_text(f"{sock.getsockname()[1]}\n")
            partial.replace(args.port_file)  # whole, so that a reader never sees it empty

        server.startup = startup  # type: ignore[method-assign]
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
