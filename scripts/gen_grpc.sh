#!/usr/bin/env bash
# Regenerate edgens/serve/proto/grpc_service_pb2.py and _pb2_grpc.py from grpc_service.proto (needs grpcio-tools:
# pip install grpcio-tools). The generated modules are committed, so that `edgens serve` needs only grpcio and
# protobuf at run time; tests/serve/test_grpc.py checks that they match the .proto. OUT (default: the proto's own
# folder) lets that test generate elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-edgens/serve/proto}
python3 -m grpc_tools.protoc -I edgens/serve/proto --python_out="$out" --grpc_python_out="$out" \
  edgens/serve/proto/grpc_service.proto
# The messages live in a descriptor pool of their own: tritonclient (and Triton's own stubs) define the same names
# (inference.ModelInferRequest, ...) in protobuf's default pool, and a process may import both.
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(/' \
  "$out/grpc_service_pb2.py"
grep -q '^DESCRIPTOR = _descriptor_pool.DescriptorPool()' "$out/grpc_service_pb2.py"
# grpc_tools writes an absolute import of the messages module; the package's own is absolute in the package.
sed -i 's/^import grpc_service_pb2 as grpc__service__pb2$/from edgens.serve.proto import grpc_service_pb2 as grpc__service__pb2/' \
  "$out/grpc_service_pb2_grpc.py"
