"""Server reflection as ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection serves only v1alpha; newer tools (grpcurl, Postman, grpcui) ask for v1 first. The
two protocols are the same messages in another package, byte for byte on the wire, so v1 is
v1alpha's servicer mounted on v1's method path. v1's own file descriptor (v1alpha's, the package
renamed) joins the default pool so that v1 can describe itself like every other service.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import _async as reflection_aio
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha.reflection import SERVICE_NAME as V1ALPHA_SERVICE_NAME

__all__ = ["V1ALPHA_SERVICE_NAME", "V1_SERVICE_NAME", "enable_reflection"]

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
_V1_FILE = "grpc/reflection/v1/reflection.proto"  # its name in grpc's own repository
_OLD, _NEW = "grpc.reflection.v1alpha", "grpc.reflection.v1"


def _v1_file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's FileDescriptorProto as v1: package, type references and options renamed."""
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _V1_FILE
    proto.package = _NEW

    def rename(type_name: str) -> str:
        old = f".{_OLD}."
        return f".{_NEW}." + type_name[len(old) :] if type_name.startswith(old) else type_name

    for message in proto.message_type:
        for fld in message.field:
            if fld.HasField("type_name"):
                fld.type_name = rename(fld.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    # as in grpc's v1 reflection.proto: not deprecated, its own Go and Java packages
    proto.options.ClearField("deprecated")
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_package = "io.grpc.reflection.v1"
    return proto


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Adds v1's descriptor to ``pool`` unless something (a later grpcio-reflection) already did."""
    try:
        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except KeyError:
        pass
    try:  # a grpcio-reflection that ships v1 registers it on import: prefer its own
        import grpc_reflection.v1.reflection_pb2  # type: ignore[import-not-found]  # noqa: F401

        pool.FindServiceByName(V1_SERVICE_NAME)
        return
    except (ImportError, KeyError):
        pass
    pool.Add(_v1_file_descriptor())


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serves reflection for ``service_names`` (plus both reflection services) on ``server``."""
    pool = descriptor_pool.Default()
    _register_v1_descriptor(pool)
    names = (*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
    servicer = reflection_aio.ReflectionServicer(names)
    for service in (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME):
        # the same servicer and v1alpha's (de)serializers for both: the bytes are identical
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
        methods = {"ServerReflectionInfo": handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        server.add_registered_method_handlers(service, methods)  # type: ignore[attr-defined]
