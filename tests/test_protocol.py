"""The protocol from outside Python: .proto files that resolve from the shipped tree, reflection v1 and
v1alpha, and the Node.js client of examples/node against a live server (docs/PROTOCOL.md)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2
from runtime_support import expected_split, frames, serving

from hnd.common.split import split_model
from hnd.edge.torch_modes import to_tensor
from hnd.proto import generate

ROOT = Path(__file__).resolve().parents[1]
NODE_CLIENT = ROOT / "examples" / "node"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


def test_proto_imports_resolve_from_the_shipped_tree(tmp_path):
    """Every import names a file under proto/ (the include root), as protoc, grpc-js and buf look for it."""
    protos = sorted(generate.PROTO_DIR.glob("*.proto"))
    for proto in protos:
        for imported in re.findall(r'^import "([^"]+)";', proto.read_text(), re.M):
            assert (generate.PROTO_ROOT / imported).is_file(), f"{proto.name} imports {imported}"
        package = re.search(r"^package ([\w.]+);", proto.read_text(), re.M).group(1)
        assert proto.parent.relative_to(generate.PROTO_ROOT).as_posix() == package.replace(".", "/")
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (a dev dependency) runs protoc")
    include = Path(generate.__file__).parent  # plain -I proto, no virtual path mapping
    rc = protoc.main(
        [
            "protoc",
            f"-I{include}",
            f"--descriptor_set_out={tmp_path / 'set.pb'}",
            "--include_imports",
            *(f"hnd/v1/{p.name}" for p in protos),
        ]
    )
    assert rc == 0


def _reflect(port: int, service: str, request: reflection_pb2.ServerReflectionRequest):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return next(iter(method(iter([request]), timeout=30)))


@pytest.mark.parametrize("service", ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"])
def test_reflection_v1_and_v1alpha(model, service):
    from google.protobuf import descriptor_pb2

    with serving(model) as server:
        listed = _reflect(server.port, service, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listed.list_services_response.service}
        assert {
            "hnd.v1.SplitInference",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        found = _reflect(
            server.port, service, reflection_pb2.ServerReflectionRequest(file_containing_symbol="hnd.v1.SplitInference")
        )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto
    ]
    by_name = {f.name: f for f in files}
    assert "hnd/v1/split_inference.proto" in by_name
    assert list(by_name["hnd/v1/split_inference.proto"].dependency) == ["hnd/v1/tensor.proto"]


@pytest.fixture(scope="module")
def node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js client example (examples/node) is not tested here")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("examples/node has no node_modules: run `npm ci --prefix examples/node` (the README's set-up does)")
    return node


def test_node_client_gets_exactly_the_in_process_detections(model, node, tmp_path):
    """A Node.js client built from the .proto files and docs/PROTOCOL.md's rules alone: lossless 32-bit
    bottleneck, sizes derived from GetModelInfo; the detections equal tail(head(x)) in process."""
    image = frames(1, sizes=((120, 150),))[0]
    head, _ = split_model(model)
    with torch.inference_mode():
        z, meta = head([to_tensor(image)])
    raw = tmp_path / "z.f32"
    raw.write_bytes(z.contiguous().numpy().astype("<f4").tobytes())
    with serving(model) as server:
        out = subprocess.run(
            [node, str(NODE_CLIENT / "client.js"), f"127.0.0.1:{server.port}", str(raw), "120", "150"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["image_size"] == list(meta.image_sizes[0]) and result["padded_size"] == list(meta.padded_size)
    assert result["request_id"] == "node-1"
    expected = expected_split(model, image, bits=32)[0]
    got = result["detections"][0]
    assert got["labels"] == expected["labels"].tolist()
    assert got["scores"] == expected["scores"].tolist()  # float32 -> JS number -> JSON -> float: exact
    assert got["boxes"] == expected["boxes"].reshape(-1).tolist()
    assert float(result["timings"]["compute_us"]) > 0
    refusal = result["refusal"]
    assert refusal["code"] == "INVALID_ARGUMENT"
    assert (
        "padded size 160x200 must be a multiple of 32" in refusal["details"]
        and "expected 160x224" in refusal["details"]
    )
