"""Regenerate the committed ``hnd.proto.v1`` modules from ``proto/hnd/v1/*.proto``, and the Open Inference
Protocol's ``hnd.proto.inference`` modules from ``proto/inference/*.proto`` (needs grpcio-tools).

    python -m hnd.proto.generate [--out DIR] [--inference-out DIR]

The .proto files import each other as ``hnd/v1/<name>.proto`` relative to ``proto/`` (the path matches
their package ``hnd.v1``, so protoc, grpc-js or buf resolve them from the shipped tree with ``-I proto``).
protoc writes Python imports from those paths (``from hnd.v1 import tensor_pb2``); they are rewritten to
where the modules live in the installed package (``from hnd.proto.v1 import tensor_pb2``).

``proto/inference/`` holds Triton's ``grpc_service.proto`` and ``model_config.proto`` unchanged (package
``inference``, a superset of KServe's ``open_inference_grpc.proto``/``grpc_predict_v2.proto`` with the same
field numbers, plus the repository index and model configuration that Triton's clients ask for), so
unmodified tritonclient / perf_analyzer / KServe clients talk to hnd-server. They import each other by bare
file name (``import "model_config.proto"``), which is rewritten the same way.
"""

from __future__ import annotations

import argparse
import tempfile
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent  # include path: imports read "hnd/v1/tensor.proto"
PROTO_DIR = PROTO_ROOT / "hnd" / "v1"
OUT_DIR = PROTO_ROOT / "v1"
PROTO_PACKAGE_DIR = "hnd/v1"
PYTHON_PACKAGE = "hnd.proto.v1"
INFERENCE_DIR = PROTO_ROOT / "inference"  # sources and generated modules side by side
INFERENCE_PACKAGE = "hnd.proto.inference"


def _protoc(args: list[str], root: Path = PROTO_ROOT) -> None:
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"  # well-known types
    rc = protoc.main(["grpc_tools.protoc", f"-I{root}", f"-I{include}", *args])
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {args}")


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Compile every .proto into ``out_dir`` (*_pb2.py, *_pb2.pyi, and *_pb2_grpc.py for services).

    Returns the written files, sorted.
    """
    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", *(f"{PROTO_PACKAGE_DIR}/{p.name}" for p in protos)])
        services = [p for p in protos if "\nservice " in p.read_text()]
        if services:
            _protoc([f"--grpc_python_out={tmp}", *(f"{PROTO_PACKAGE_DIR}/{p.name}" for p in services)])
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        proto_import = "from " + PROTO_PACKAGE_DIR.replace("/", ".") + " import "
        for src in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            text = src.read_text().replace(proto_import, f"from {PYTHON_PACKAGE} import ")
            dest = out_dir / src.name
            dest.write_text(text)
            written.append(dest)
    return written


def generate_inference(out_dir: Path = INFERENCE_DIR) -> list[Path]:
    """Compile ``proto/inference/*.proto`` into ``out_dir`` as the ``hnd.proto.inference`` modules (bare-name
    imports such as ``import model_config_pb2 as ...`` rewritten to the package). Returns the written files."""
    protos = sorted(p.name for p in INFERENCE_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", *protos], INFERENCE_DIR)
        services = [p for p in protos if "\nservice " in (INFERENCE_DIR / p).read_text()]
        _protoc([f"--grpc_python_out={tmp}", *services], INFERENCE_DIR)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted(Path(tmp).iterdir()):
            text = src.read_text()
            for name in protos:
                module = name.removesuffix(".proto") + "_pb2"
                text = text.replace(f"import {module} as ", f"from {INFERENCE_PACKAGE} import {module} as ")
                text = text.replace(f"\nimport {module}\n", f"\nfrom {INFERENCE_PACKAGE} import {module}\n")
            dest = out_dir / src.name
            dest.write_text(text)
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    parser.add_argument(
        "--inference-out", type=Path, default=INFERENCE_DIR, help=f"output folder (default {INFERENCE_DIR})"
    )
    args = parser.parse_args(argv)
    for path in [*generate(args.out), *generate_inference(args.inference_out)]:
        print(path)


if __name__ == "__main__":
    main()
