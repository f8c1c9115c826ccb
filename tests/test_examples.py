"""examples/python_client.py and examples/callback_loop.py against a real server (hnd.serve): what they print
matches what the API returns, in frame order."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from runtime_support import write_frames

import hnd

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "test/faster_rcnn-b3ch"


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server():
    with hnd.serve(CONFIG, device="cpu") as s:
        yield s


def test_python_client_prints_each_images_detections_in_order(server, tmp_path, capsys):
    folder = write_frames(tmp_path / "frames", 3)
    paths = sorted(str(p) for p in folder.iterdir())
    client = example("python_client")
    argv = ["--server", server.target, "--config", CONFIG, "--random-weights", "0", "--min-score", "0", *paths]
    assert client.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == paths
    with hnd.connect(server.target, config=CONFIG, random_weights=0) as detector:
        want = detector.detect(client.read_rgb(paths[0]))
    assert lines[0]["labels"] == want.labels.tolist() and len(lines[0]["boxes"]) == len(want) > 0
    assert all(line["bytes"] > 0 and line["replica"] for line in lines)
    assert client.main(["--server", server.target, "--config", CONFIG, "--random-weights", "0", "nope.jpg"]) == 2
    assert "python_client: error: nope.jpg: cannot read this image" in capsys.readouterr().err


def test_callback_loop_answers_every_frame_it_took_in_order(server, capsys):
    loop = example("callback_loop")
    argv = ["--server", server.target, "--config", CONFIG, "--random-weights", "0", "--frames", "6", "--fps", "20"]
    assert loop.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    dropped = int(out[-1].split()[1])
    frames = [line for line in out if line.startswith("frame ")]
    assert len(frames) + dropped == 6 and len(frames) >= 2
    assert [int(line.split()[1].rstrip(":")) for line in frames] == list(range(len(frames)))
    assert all(": OK," in line for line in frames)
