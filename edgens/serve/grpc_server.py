"""The gRPC transport of ``edgens serve``: KServe v2's ``inference.GRPCInferenceService`` (as Triton serves it) over
the same :class:`~edgens.serve.service.InferenceService` as HTTP: one batcher, one set of metrics and statistics, one
token, one drain.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (``raw_input_contents``,
typed ``contents`` or system shared memory; budgets as request parameters; outputs as ``raw_output_contents``, as
Triton sends them, or into shared memory), ModelStreamInfer (requests of one stream answered in order, an error as
the response's ``error_message``), ModelConfig, ModelStatistics and the SystemSharedMemory methods; the
CudaSharedMemory methods answer that no region is registered and refuse to register one. Any other method
(repository, trace, logging) is UNIMPLEMENTED.

Errors: the service's refusal (:data:`~edgens.serve.service.ERROR_STATUS`) mapped to the gRPC status that fits
(:data:`GRPC_STATUS`), with its one-line message; never UNKNOWN with a traceback.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from grpc import aio

from edgens.serve.proto import grpc_service_pb2 as pb
from edgens.serve.proto import grpc_service_pb2_grpc as pb_grpc
from edgens.serve.protocol import VERSION, InferRequest, ProtocolError, output_arrays, parse_request, \
    response_parameters, shared_output_parameters, write_shared_outputs
from edgens.serve.service import InferenceService, Refusal, log_infer

log = logging.getLogger("edgens.serve")

# The refusal's outcome (the metrics' label) or HTTP status -> the gRPC status code.
GRPC_STATUS: dict[str, grpc.StatusCode] = {
    "bad_request": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthorized": grpc.StatusCode.UNAUTHENTICATED,
    "forbidden": grpc.StatusCode.PERMISSION_DENIED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,  # what grpc itself says of a message over its limit
    "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "stopping": grpc.StatusCode.UNAVAILABLE,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "error": grpc.StatusCode.INTERNAL,
}
OPEN_METHODS = ("ServerLive", "ServerReady")  # probes need no token, as on HTTP

# Typed contents: the field of InferTensorContents that carries each datatype.
CONTENTS_FIELD = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
                  "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
                  "FP32": "fp32_contents", "FP64": "fp64_contents"}


def code_for(refusal: Refusal) -> grpc.StatusCode:
    return GRPC_STATUS.get(refusal.outcome, grpc.StatusCode.INTERNAL)


def parameter_value(parameter: pb.InferParameter) -> Any:
    """An InferParameter's value as the JSON protocol would carry it (None when unset)."""
    choice = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, choice) if choice is not None else None


def infer_parameter(value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=str(value))


def parse_grpc_infer(request: pb.ModelInferRequest, service: InferenceService) -> InferRequest:
    """A ModelInferRequest in the JSON protocol's form, parsed by the same rules (:func:`parse_request`).

    Raises:
        ProtocolError: anything malformed, with what was expected.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise ProtocolError(f"raw_input_contents: expected one entry per input ({len(request.inputs)}), got "
                            f"{len(raw)}")
    inputs = []
    for i, tensor in enumerate(request.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = {key: parameter_value(value) for key, value in tensor.parameters.items()}
        if raw:
            if tensor.HasField("contents"):
                raise ProtocolError(f"input {tensor.name}: give raw_input_contents or contents, not both")
            parameters["binary_data_size"] = len(raw[i])
        elif "shared_memory_region" not in parameters:
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is None or not tensor.HasField("contents"):
                raise ProtocolError(f"input {tensor.name}: no data; expected raw_input_contents or contents."
                                    f"{field or 'the field of its datatype'}")
            entry["data"] = list(getattr(tensor.contents, field))
        entry["parameters"] = parameters
        inputs.append(entry)
    as_json: dict[str, Any] = {"inputs": inputs,
                               "parameters": {k: parameter_value(v) for k, v in request.parameters.items()}}
    if request.id:
        as_json["id"] = request.id
    if request.outputs:
        as_json["outputs"] = [{"name": o.name, "parameters": {k: parameter_value(v) for k, v in o.parameters.items()}}
                              for o in request.outputs]
    return parse_request(as_json, memoryview(b"".join(raw)), service.model, service.shared_memory)


def encode_grpc_infer(parsed: InferRequest, prediction: Any, service: InferenceService) -> pb.ModelInferResponse:
    """The ModelInferResponse: every output asked for as raw bytes (or written to the shared memory the request
    placed it in: then its raw entry is empty, as Triton's, so that entries keep the outputs' order), the call's
    report as parameters.

    Raises:
        ProtocolError: an output placed in shared memory does not fit there.
    """
    response = pb.ModelInferResponse(model_name=service.model.name, model_version=VERSION, id=parsed.id or "")
    for key, value in response_parameters(prediction).items():
        response.parameters[key].CopyFrom(infer_parameter(value))
    arrays = output_arrays(parsed, prediction, service.model)
    write_shared_outputs(parsed, arrays, service.shared_memory)
    for output, datatype, array in arrays:
        tensor = response.outputs.add(name=output.name, datatype=datatype, shape=list(array.shape))
        if output.shared_memory is not None:
            for key, value in shared_output_parameters(output, array).items():
                tensor.parameters[key].CopyFrom(infer_parameter(value))
            response.raw_output_contents.append(b"")
        else:
            response.raw_output_contents.append(array.tobytes())
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The gRPC methods, each a thin call into the :class:`InferenceService`."""

    def __init__(self, service: InferenceService, access_log: bool = True):
        self.service = service
        self.access_log = access_log

    def _log(self, prediction: Any, refusal: Refusal | None, arrival: float, context: aio.ServicerContext) -> None:
        if self.access_log:
            peer = context.peer() or ""  # "ipv4:127.0.0.1:50000", "ipv6:[::1]:50000"
            host = peer.split(":", 1)[1].rsplit(":", 1)[0].strip("[]") if ":" in peer else None
            log_infer(prediction, refusal, arrival, host, "grpc")

    async def _ask(self, context: aio.ServicerContext, method: Callable[..., Any], *args: Any) -> Any:
        """``method(*args)`` of the service, or the call aborted with the status and one line of the
        :class:`ProtocolError` it raised (not counted as an infer request)."""
        try:
            return method(*args)
        except ProtocolError as err:
            refusal = self.service.refusal(err, infer=False)
            await context.abort(code_for(refusal), refusal.message)
            raise  # not reached: abort raises

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.service.readiness()[0])

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        ready, _ = await self._ask(context, self.service.model_readiness, request.name, request.version or None)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return json_format.ParseDict(self.service.server_metadata(), pb.ServerMetadataResponse())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        metadata = await self._ask(context, self.service.model_metadata, request.name, request.version or None)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: aio.ServicerContext
                          ) -> pb.ModelConfigResponse:
        config = await self._ask(context, self.service.model_config, request.name, request.version or None)
        return json_format.ParseDict({"config": config}, pb.ModelConfigResponse())

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        statistics = await self._ask(context, self.service.model_statistics, request.name or None,
                                     request.version or None)
        return json_format.ParseDict(statistics, pb.ModelStatisticsResponse())

    async def SystemSharedMemoryStatus(self, request: pb.SystemSharedMemoryStatusRequest,
                                       context: aio.ServicerContext) -> pb.SystemSharedMemoryStatusResponse:
        regions = await self._ask(context, self.service.shared_memory_status, request.name or None)
        response = pb.SystemSharedMemoryStatusResponse()
        for region in regions:
            response.regions[region["name"]].CopyFrom(pb.SystemSharedMemoryStatusResponse.RegionStatus(**region))
        return response

    async def SystemSharedMemoryRegister(self, request: pb.SystemSharedMemoryRegisterRequest,
                                         context: aio.ServicerContext) -> pb.SystemSharedMemoryRegisterResponse:
        await self._ask(context, self.service.register_shared_memory, request.name,
                        {"key": request.key, "offset": request.offset, "byte_size": request.byte_size})
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: pb.SystemSharedMemoryUnregisterRequest,
                                           context: aio.ServicerContext) -> pb.SystemSharedMemoryUnregisterResponse:
        await self._ask(context, self.service.unregister_shared_memory, request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: pb.CudaSharedMemoryStatusRequest,
                                     context: aio.ServicerContext) -> pb.CudaSharedMemoryStatusResponse:
        await self._ask(context, self.service.cuda_shared_memory, "status", request.name or None)
        return pb.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: pb.CudaSharedMemoryRegisterRequest,
                                       context: aio.ServicerContext) -> pb.CudaSharedMemoryRegisterResponse:
        await self._ask(context, self.service.cuda_shared_memory, "register", request.name or None)
        return pb.CudaSharedMemoryRegisterResponse()

    async def CudaSharedMemoryUnregister(self, request: pb.CudaSharedMemoryUnregisterRequest,
                                         context: aio.ServicerContext) -> pb.CudaSharedMemoryUnregisterResponse:
        await self._ask(context, self.service.cuda_shared_memory, "unregister", request.name or None)
        return pb.CudaSharedMemoryUnregisterResponse()

    async def _infer(self, request: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, Any]:
        """Answer one request (raises what refuses it): the response and its prediction, counted in the metrics and
        statistics."""
        arrival = time.perf_counter()  # gRPC hands a request over whole: its deadline counts from then
        with self.service.admission(request.model_name, request.model_version or None):
            parsed = parse_grpc_infer(request, self.service)
            try:
                parsed_at = time.perf_counter()
                prediction = await self.service.answer(parsed, arrival)
                answered_at = time.perf_counter()
                response = encode_grpc_infer(parsed, prediction, self.service)
            finally:
                parsed.release(self.service.shared_memory)
            self.service.count_answer(prediction, arrival, parsed_at, answered_at)
        return response, prediction

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        arrival = time.perf_counter()
        try:
            response, prediction = await self._infer(request)
        except Exception as err:  # noqa: BLE001  (every refusal is one status and one line)
            refusal = self.service.refuse_infer(err, arrival)
            self._log(None, refusal, arrival, context)
            await context.abort(code_for(refusal), refusal.message)
        self._log(prediction, None, arrival, context)
        return response

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context: aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in requests:
            arrival = time.perf_counter()
            try:
                response, prediction = await self._infer(request)
            except Exception as err:  # noqa: BLE001  (the stream goes on; this request's error is its answer)
                refusal = self.service.refuse_infer(err, arrival)
                self._log(None, refusal, arrival, context)
                yield pb.ModelStreamInferResponse(error_message=refusal.message)
                continue
            self._log(prediction, None, arrival, context)
            yield pb.ModelStreamInferResponse(infer_response=response)


class TokenInterceptor(aio.ServerInterceptor):
    """Every method but ServerLive and ServerReady needs ``authorization: Bearer TOKEN`` metadata (compared in
    constant time), as HTTP needs the header."""

    def __init__(self, token: str, service: InferenceService):
        self.expected = f"Bearer {token}".encode()
        self.service = service

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        method = details.method.rsplit("/", 1)[-1]
        given = next((value for key, value in details.invocation_metadata or () if key == "authorization"), "")
        given = given.encode() if isinstance(given, str) else given
        if method in OPEN_METHODS or hmac.compare_digest(given, self.expected):
            return await continuation(details)
        if method in ("ModelInfer", "ModelStreamInfer"):
            self.service.metrics.refused("unauthorized")
        reason = "no authorization metadata" if not given else "the bearer token is wrong"
        message = f"unauthorized: {reason}; send authorization: Bearer <token from --token-file>"

        async def deny(request: Any, context: aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        if method == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def create_grpc_server(service: InferenceService, token: str | None, max_request_bytes: int,
                       access_log: bool = True) -> aio.Server:
    """The gRPC server (not started, no port yet) for ``service``; requests above ``max_request_bytes`` are refused
    by grpc itself with RESOURCE_EXHAUSTED."""
    options = [("grpc.max_receive_message_length", max_request_bytes),
               ("grpc.max_send_message_length", -1),
               ("grpc.so_reuseport", 0)]  # a busy port must fail, not be shared with another server
    interceptors = [TokenInterceptor(token, service)] if token is not None else []
    server = aio.server(options=options, interceptors=interceptors)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(service, access_log), server)
    return server
