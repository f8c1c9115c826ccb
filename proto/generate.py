"""Regenerate the committed ``hnd.proto.v1`` modules from ``proto/hnd/v1/*.proto`` (needs grpcio-tools).

    python -m hnd.proto.generate [--out DIR]

The .proto files import each other as ``hnd/v1/<name>.proto`` relative to ``proto/`` (the path matches
their package ``hnd.v1``, so protoc, grpc-js or buf resolve them from the shipped tree with ``-I proto``).
protoc writes Python imports from those paths (``from hnd.v1 import tensor_pb2``); they are rewritten to
where the modules live in the installed package (``from hnd.proto.v1 import tensor_pb2``).
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


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc

    include = resources.files("grpc_tools") / "_proto"  # well-known types
    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args])
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output folder (default {OUT_DIR})")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    main()
