"""Detection agreement: how far a setting's detections are from the reference (local mode's, unsplit float)."""
from __future__ import annotations

import torch
from torchvision.ops import box_iou

from hnd.bench.plan import Setting
from hnd.bench.measure import Sample


def match_f1(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], iou: float = 0.5,
             score: float = 0.5) -> float:
    """F1 of ``got`` against ``reference``: greedy same-label matching at IoU >= iou, both cut at score.

    Both empty counts as full agreement (1.0).
    """
    r = reference["scores"] >= score
    g = got["scores"] >= score
    rb, rl = reference["boxes"][r], reference["labels"][r]
    order = torch.argsort(got["scores"][g], descending=True)
    gb, gl = got["boxes"][g][order], got["labels"][g][order]
    if len(rb) == 0 and len(gb) == 0:
        return 1.0
    if len(rb) == 0 or len(gb) == 0:
        return 0.0
    ious = box_iou(gb, rb)
    ious[gl[:, None] != rl[None, :]] = -1.0
    taken = torch.zeros(len(rb), dtype=torch.bool)
    tp = 0
    for i in range(len(gb)):
        cand = ious[i].masked_fill(taken, -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou:
            taken[j] = True
            tp += 1
    return 2 * tp / (len(gb) + len(rb))


def add_agreement(settings: list[Setting], samples: dict[str, list[Sample]],
                  detections: dict[str, list[dict[str, torch.Tensor]]], score: float) -> list[int]:
    """F1 of every setting's detections against local mode's (the unsplit float model), per frame.

    Returns the reference's detection count at the score cut per frame: F1 over zero boxes proves nothing.
    """
    reference = detections[next(s.key for s in settings if s.mode == "local")]
    for s in settings:
        for sample, dets, ref in zip(samples[s.key], detections[s.key], reference):
            sample.f1 = match_f1(ref, dets, 0.5, score)
    return [int((ref["scores"] >= score).sum()) for ref in reference]

