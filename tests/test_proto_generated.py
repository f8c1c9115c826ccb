"""The committed hnd.proto.v1 modules import under the package and match what the .proto files generate."""

from __future__ import annotations

from pathlib import Path

import pytest

import hnd.proto.v1
from hnd.proto import generate


def committed_files() -> dict[str, bytes]:
    folder = Path(hnd.proto.v1.__file__).parent
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.iterdir())
        if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    }


def test_generated_modules_are_up_to_date(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the modules")
    generate.generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())}
    committed = committed_files()
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from proto/hnd/v1/*.proto: run `python -m hnd.proto.generate` and commit"


def test_modules_import_under_the_package():
    from hnd.proto.v1 import split_inference_pb2, split_inference_pb2_grpc, tensor_pb2

    service = split_inference_pb2.DESCRIPTOR.services_by_name["SplitInference"]
    assert service.full_name == "hnd.v1.SplitInference"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {"Infer": (False, False), "InferStream": (True, True), "GetModelInfo": (False, False)}
    assert split_inference_pb2_grpc.SplitInferenceStub and split_inference_pb2_grpc.SplitInferenceServicer
    assert tensor_pb2.Tensor.DESCRIPTOR.full_name == "hnd.v1.Tensor"


def test_every_enum_starts_unspecified():
    from hnd.proto.v1 import split_inference_pb2, tensor_pb2

    enums = list(tensor_pb2.DESCRIPTOR.enum_types_by_name.values())
    enums += [e for m in split_inference_pb2.DESCRIPTOR.message_types_by_name.values() for e in m.enum_types]
    assert len(enums) == 5  # + StreamFrame.Type
    for enum in enums:
        assert enum.values_by_number[0].name.endswith("_UNSPECIFIED"), enum.full_name


def test_messages_leave_room_to_grow():
    """Every message but the empty request reserves field numbers for evolution."""
    from google.protobuf import descriptor_pb2

    from hnd.proto.v1 import split_inference_pb2, tensor_pb2

    for module in (tensor_pb2, split_inference_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        for message in proto.message_type:
            if message.field:
                assert message.reserved_range, f"{message.name} reserves no field numbers"


def test_inference_modules_are_up_to_date_and_keep_the_protocols_names(tmp_path):
    """hnd.proto.inference is generated from Triton's unmodified protos: package ``inference``, so tritonclient,
    perf_analyzer and KServe clients call ``/inference.GRPCInferenceService/ModelInfer`` on hnd-server."""
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the modules")
    import hnd.proto.inference
    from hnd.proto.inference import grpc_service_pb2

    generate.generate_inference(tmp_path)
    folder = Path(hnd.proto.inference.__file__).parent
    for fresh in sorted(tmp_path.iterdir()):
        assert fresh.read_bytes() == (folder / fresh.name).read_bytes(), (
            f"{fresh.name}: run python -m hnd.proto.generate"
        )
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"} <= {
        m.name for m in service.methods
    }
