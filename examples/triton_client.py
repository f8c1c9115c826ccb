"""hnd-server through Triton's own client (tritonclient[grpc]), over the Open Inference Protocol (KServe v2).

    python examples/triton_client.py --server 127.0.0.1:50051 --image photo.jpg --out detections.npz
    python examples/triton_client.py --server 127.0.0.1:50051 --bottleneck head.npz --out detections.npz

No hnd import: this runs wherever ``pip install "tritonclient[grpc]"`` does (it pins protobuf < 7, so keep it
out of hnd's own environment; ``.ci/make-tritonclient-venv`` makes one). ``--image`` sends the encoded file to
the ``hnd_offload`` model; ``--bottleneck`` sends the head's 8-bit symbols to ``hnd_tail`` from an .npz with
``symbols`` uint8 [1, C, h, w], ``image_size`` and ``original_size`` int64 [2], ``scale``, ``zero_point`` and
``fingerprint``. Writes the outputs (boxes float32 [N, 4], labels int64 [N], scores float32 [N], ...) to
``--out`` and prints the server's and the model's metadata as one JSON line. A refused request exits 1 with
``error: <gRPC status>: <message>``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="hnd-server's gRPC address HOST:PORT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--image", help="an encoded JPEG / PNG / WebP file: the hnd_offload model")
    what.add_argument("--bottleneck", help="an .npz of the head's 8-bit symbols and sizes: the hnd_tail model")
    p.add_argument("--out", required=True, help="where the outputs go (.npz)")
    p.add_argument("--score-threshold", type=float, default=None)
    args = p.parse_args(argv)

    client = grpcclient.InferenceServerClient(args.server)
    model = "hnd_offload" if args.image else "hnd_tail"
    parameters: dict = {}
    if args.score_threshold is not None:
        parameters["score_threshold"] = args.score_threshold
    if args.image:
        with open(args.image, "rb") as f:
            data = np.array([f.read()], dtype=np.object_)  # BYTES [1]: one encoded image
        image = grpcclient.InferInput("IMAGE", [1], "BYTES")
        image.set_data_from_numpy(data)
        inputs = [image]
    else:
        b = np.load(args.bottleneck)
        inputs = []
        for name, key, dtype in (
            ("BOTTLENECK", "symbols", "UINT8"),
            ("IMAGE_SIZE", "image_size", "INT64"),
            ("ORIGINAL_SIZE", "original_size", "INT64"),
        ):
            tensor = grpcclient.InferInput(name, list(b[key].shape), dtype)
            tensor.set_data_from_numpy(b[key])
            inputs.append(tensor)
        parameters.update(
            scale=float(b["scale"]), zero_point=int(b["zero_point"]), weights_fingerprint=str(b["fingerprint"])
        )
    try:
        live, ready = client.is_server_live(), client.is_server_ready()
        metadata = client.get_model_metadata(model, as_json=True)
        index = client.get_model_repository_index(as_json=True)
        result = client.infer(model, inputs, parameters=parameters or None)
    except InferenceServerException as exc:
        print(f"error: {exc.status()}: {exc.message()}", file=sys.stderr)
        return 1
    outputs = {o["name"]: result.as_numpy(o["name"]) for o in metadata["outputs"]}
    np.savez(args.out, **outputs)
    print(
        json.dumps(
            {
                "live": live,
                "ready": ready,
                "server": client.get_server_metadata(as_json=True),
                "models": [m["name"] for m in index.get("models", [])],
                "inputs": metadata["inputs"],
                "detections": len(outputs["scores"]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
