"""The request budget: torchvision's resize rule, padding, original-size and mask bounds; client text."""

from __future__ import annotations

import logging

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from hnd.common.sizes import bottleneck_hw, is_resize_of, padded_size, resized_size
from hnd.common.split import SplitMeta
from hnd.server.budget import BudgetError, check_bottleneck_shape, check_split_meta, make_budget
from hnd.server.text import RateLimitedLog, client_text


@pytest.mark.parametrize("min_size,max_size", [(160, 256), (800, 1333), (512, 512), (90, 4000)])
@pytest.mark.parametrize("original", [(120, 150), (200, 100), (90, 90), (480, 640), (4, 333), (1079, 1921)])
def test_resize_and_pad_match_torchvision(original, min_size, max_size):
    transform = GeneralizedRCNNTransform(min_size, max_size, [0.0] * 3, [1.0] * 3)
    images, _ = transform([torch.zeros(3, *original)])
    assert resized_size(original, min_size, max_size) == tuple(images.image_sizes[0])
    assert padded_size(images.image_sizes) == tuple(images.tensors.shape[-2:])
    assert is_resize_of(tuple(images.image_sizes[0]), original)


def test_resize_consistency_allows_a_pixel_of_rounding_only():
    assert is_resize_of((160, 200), (120, 150))
    assert is_resize_of((161, 200), (120, 150))  # float32 (ONNX) scale vs float64
    assert is_resize_of((120, 150), (120, 150))  # native resolution
    assert not is_resize_of((163, 200), (120, 150))
    assert not is_resize_of((200, 160), (120, 150))  # transposed
    assert not is_resize_of((160, 200), (8000, 8000))


def budget(**kw):
    args = dict(max_images=8, model_min_size=160, model_max_size=256, size_divisible=32, mask_detections=0)
    args.update(kw)
    return make_budget(**args)


def meta(original, image, padded=None):
    return SplitMeta((original,), (image,), padded or padded_size([image]))


def test_the_models_own_resize_is_accepted_and_limits_default_to_it():
    b = budget()
    assert (b.max_short_side, b.max_long_side, b.max_padded_side, b.max_padded_pixels) == (160, 256, 256, 256 * 256)
    for original in ((120, 150), (200, 100), (90, 90), (1080, 1920), (8000, 20)):
        image = resized_size(original, 160, 256)
        check_split_meta(meta(original, image), b)
        check_bottleneck_shape((1, 3, *bottleneck_hw(padded_size([image]))), meta(original, image), 3)


def test_other_resizes_within_the_advertised_bounds_are_accepted():
    b = budget(max_short_side=480, max_long_side=640)
    check_split_meta(meta((480, 640), (480, 640)), b)  # native resolution
    check_split_meta(meta((480, 640), resized_size((480, 640), 320, 500)), b)
    with pytest.raises(
        BudgetError, match="short side <= 480, long side <= 640; the largest for original 960x1280 is 480x640"
    ):
        check_split_meta(meta((960, 1280), (720, 960)), b)


@pytest.mark.parametrize(
    "case,reason,match",
    [
        (meta((120, 150), (160, 256)), "resize_rule", "not a resize of original 120x150.*gives 160x200"),
        (meta((9000, 9000), (160, 160)), "original_size", "exceeds max_original_side 8192"),
        (meta((2048, 2048), (2048, 2048)), "image_size", "short side <= 160"),
        (meta((120, 150), (160, 200), (2048, 2048)), "padded_size", "exceeds max_padded_side 256.*expected 160x224"),
        (meta((120, 150), (160, 200), (160, 200)), "padded_size", "multiple of 32.*expected 160x224"),
        (meta((120, 150), (160, 200), (128, 224)), "padded_size", "covering every image: expected 160x224"),
    ],
)
def test_refusals_say_what_was_expected(case, reason, match):
    with pytest.raises(BudgetError, match=match) as info:
        check_split_meta(case, budget())
    assert info.value.reason == reason


def test_a_larger_padding_of_a_sub_batch_is_accepted():
    check_split_meta(SplitMeta(((120, 150),), ((160, 200),), (224, 224)), budget())


def test_mask_pasting_bounds_the_original_pixels():
    b = budget(mask_detections=20, max_mask_bytes=64 << 20)
    assert b.max_original_pixels == (64 << 20) // (4 * 20) and b.max_mask_bytes <= 64 << 20
    check_split_meta(meta((640, 1280), (128, 256)), b)
    with pytest.raises(BudgetError, match=r"Mask R-CNN pastes 20 float32 masks.*64 MiB") as info:
        check_split_meta(meta((4000, 4000), (160, 160)), b)
    assert info.value.reason == "original_pixels"
    two = SplitMeta(((640, 1280), (640, 1280)), ((128, 256), (128, 256)), (128, 256))
    with pytest.raises(BudgetError, match="original sizes total 1638400 pixels"):
        check_split_meta(two, b)  # per request, summed over its images


def test_bottleneck_shape_error_names_the_expected_shape():
    with pytest.raises(BudgetError, match=r"expected \[1, 3, 44, 60\] \(\[B, C, Hp/4 \+ 4, Wp/4 \+ 4\]\)"):
        check_bottleneck_shape((1, 3, 40, 60), meta((120, 150), (160, 200)), 3)


def test_client_text_is_clipped_and_escaped():
    assert client_text("abc") == "abc"
    forged = "x\n2026-01-01 hnd.server WARNING forged\x1b[2J"
    out = client_text(forged)
    assert "\n" not in out and "\x1b" not in out and "\\n" in out and "\\x1b" in out
    big = client_text("f" * 1_000_000)
    assert len(big) < 120 and big.endswith("...(1000000 chars)")
    assert client_text(b"\xff\x00ok") == "\\xff\\x00ok"


def test_refusal_log_is_rate_limited_and_counts_what_it_left_out(caplog):
    now = [0.0]
    counted = []
    limited = RateLimitedLog(
        logging.getLogger("hnd.test"), burst=3, period_s=10, on_suppressed=counted.append, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="hnd.test"):
        written = [limited.warning("refused %d", i) for i in range(100)]
        now[0] = 11.0
        limited.warning("refused again")
    assert written.count(True) == 3 and len(counted) == 97 and limited.suppressed_total == 97
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 0",
        "refused 1",
        "refused 2",
        "97 similar refusal lines suppressed in the last 11 s",
        "refused again",
    ]
    for _ in range(5):
        limited.warning("more")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hnd.test"):
        limited.flush()  # the server drains: what was left out is reported at once
    assert [r.getMessage() for r in caplog.records] == ["3 similar refusal lines suppressed in the last 0 s"]
