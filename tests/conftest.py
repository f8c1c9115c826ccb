"""Shared fixtures: the tiny seeded models of configs/test/ and a few small images."""
from __future__ import annotations

import os

# Busy-waiting OpenMP workers burn the CPU that the other processes of a test (servers, edges, other
# workers) need: on a loaded 2-core machine passive waiting makes a forward several times faster.
# Only takes effect before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")
# The RPN proposal counts the configs/test/ models use (torchvision: 1000), for tests that build
# models from other configs.
FAST_PARAMS = {"rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}


@pytest.fixture(scope="session")
def tiny_model():
    """``tiny_model(kind)``: the student of ``configs/test/{kind}-b3ch.yaml`` (seeded random weights, eval).

    Built once per session and shared: treat it as read-only (``copy.deepcopy`` it to change it).
    """
    from hnd.common.config import build_model_from_config, load_config

    cache: dict[str, torch.nn.Module] = {}

    def get(kind: str) -> torch.nn.Module:
        if kind not in cache:
            cfg = load_config(f"test/{kind}-b3ch")
            cache[kind] = build_model_from_config(cfg.model, cfg.path)
        return cache[kind]

    return get


@pytest.fixture(scope="session")
def images() -> list[torch.Tensor]:
    """Three seeded RGB images in 0..1 of different sizes (3x120x150, 3x200x100, 3x90x90)."""
    g = torch.Generator().manual_seed(1234)
    return [torch.rand(3, h, w, generator=g) for h, w in ((120, 150), (200, 100), (90, 90))]
