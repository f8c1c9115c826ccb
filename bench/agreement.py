"""Detection agreement: how far a setting's detections are from the reference (local mode's, unsplit float)."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from hnd.bench.plan import Setting
from hnd.bench.measure import Sample


def match_pairs(
    reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], iou: float = 0.5, score: float = 0.5
) -> tuple[list[tuple[int, int]], int, int]:
    """Greedy same-label matching at IoU >= iou of ``got`` (by descending score) to ``reference``, both cut at score.

    Returns ([(index in got, index in reference), ...], detections kept in got, kept in reference).
    """
    reference, got = _tensors(reference), _tensors(got)
    r = torch.nonzero(reference["scores"] >= score).flatten()
    g = torch.nonzero(got["scores"] >= score).flatten()
    g = g[torch.argsort(got["scores"][g], descending=True)]
    if len(r) == 0 or len(g) == 0:
        return [], len(g), len(r)
    ious = box_iou(got["boxes"][g], reference["boxes"][r])
    ious[got["labels"][g][:, None] != reference["labels"][r][None, :]] = -1.0
    taken = torch.zeros(len(r), dtype=torch.bool)
    pairs = []
    for i in range(len(g)):
        cand = ious[i].masked_fill(taken, -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou:
            taken[j] = True
            pairs.append((int(g[i]), int(r[j])))
    return pairs, len(g), len(r)


def _tensors(dets: dict) -> dict[str, torch.Tensor]:
    """boxes / labels / scores as tensors: the edge reports numpy arrays (hnd.common.wire), in-process runs tensors."""
    return {k: torch.as_tensor(dets[k]) for k in ("boxes", "labels", "scores")}


def match_f1(
    reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], iou: float = 0.5, score: float = 0.5
) -> float:
    """F1 of ``got`` against ``reference``: greedy same-label matching at IoU >= iou, both cut at score.

    Both empty counts as full agreement (1.0).
    """
    pairs, n_got, n_ref = match_pairs(reference, got, iou, score)
    if n_got == 0 and n_ref == 0:
        return 1.0
    return 2 * len(pairs) / (n_got + n_ref)


def detection_agreement(
    reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], iou: float = 0.5, score: float = 0.0
) -> dict[str, float]:
    """F1 (as ``match_f1``) and the largest box-coordinate and score differences over the matched pairs."""
    pairs, n_got, n_ref = match_pairs(reference, got, iou, score)
    reference, got = _tensors(reference), _tensors(got)
    gi = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    ri = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    box = (got["boxes"][gi] - reference["boxes"][ri]).abs().max().item() if pairs else 0.0
    sc = (got["scores"][gi] - reference["scores"][ri]).abs().max().item() if pairs else 0.0
    f1 = 1.0 if n_got == n_ref == 0 else 2 * len(pairs) / (n_got + n_ref)
    return {
        "f1": f1,
        "max_box_diff": float(box),
        "max_score_diff": float(sc),
        "matched": len(pairs),
        "reference": n_ref,
        "got": n_got,
    }


def add_agreement(
    settings: list[Setting],
    samples: dict[str, list[Sample]],
    detections: dict[str, list[dict[str, torch.Tensor]]],
    score: float,
) -> list[int]:
    """F1 of every setting's detections against local mode's (the unsplit float model), per frame.

    Returns the reference's detection count at the score cut per frame: F1 over zero boxes proves nothing.
    """
    reference = detections[next(s.key for s in settings if s.mode == "local")]
    for s in settings:
        for sample, dets, ref in zip(samples[s.key], detections[s.key], reference):
            sample.f1 = match_f1(ref, dets, 0.5, score)
    return [int((ref["scores"] >= score).sum()) for ref in reference]
