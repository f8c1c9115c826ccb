"""Regenerate the committed ``hnd.proto.v1`` modules from ``proto/hnd/v1/*.proto`` (needs grpcio-tools).

    python -m hnd.proto.generate [--out DIR]

The .proto files are compiled under the virtual path ``hnd/proto/v1/`` so that generated imports read
``from hnd.proto.v1 import tensor_pb2``, matching where the modules live in the installed package.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent / "hnd" / "v1"
OUT_DIR = Path(__file__).resolve().parent / "v1"
VIRTUAL_DIR = "hnd/proto/v1"


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"  # well-known types
    rc = protoc.main(["grpc_tools.protoc", f"-I{VIRTUAL_DIR}={PROTO_DIR}", f"-I{include}", *args])
    if rc != 0:
        raise RuntimeError(f"protoc failed (exit {rc}) on {args}")


def generate(out_dir: Path = OUT_DIR) -> list[Path]:
    """Compile every .proto into ``out_dir`` (*_pb2.py, *_pb2.pyi, and *_pb2_grpc.py for services).

    Returns the written files, sorted.
    """
    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", f"--pyi_out={tmp}", *(f"{VIRTUAL_DIR}/{p.name}" for p in protos)])
        services = [p for p in protos if "\nservice " in p.read_text()]
        if services:
            _protoc([f"--grpc_python_out={tmp}", *(f"{VIRTUAL_DIR}/{p.name}" for p in services)])
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / VIRTUAL_DIR).iterdir()):
            written.append(Path(shutil.copyfile(src, out_dir / src.name)))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
