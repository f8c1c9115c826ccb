"""Command-line flag groups that several hnd CLIs share (hnd-server, hnd-edge, hnd-demo, hnd-bench and the
bench modules): one definition of each flag's name, type, metavar and mutual exclusion; each CLI passes
its own help text. Torch-free: the edge imports it."""

from __future__ import annotations

import argparse

# Where a --filter-threshold defaults from, and what it needs (hnd.common.config.check_filter_threshold_flag).
FILTER_THRESHOLD_DEFAULT = "(default: the config's model.filter.threshold; needs a model.filter section)"


def add_weights_arguments(
    parser: argparse.ArgumentParser,
    checkpoint_help: str | None = None,
    seed_help: str | None = None,
    *,
    seed_default: int | None = None,
    head_help: str | None = None,
) -> argparse._MutuallyExclusiveGroup:
    """``--checkpoint FILE | [--head FILE |] --random-weights SEED``: where the model's weights come from,
    one at most (hnd.common.config.with_weights). ``head_help`` adds the edge's head-only export between
    the two."""
    w = parser.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help=checkpoint_help)
    if head_help is not None:
        w.add_argument("--head", help=head_help)
    w.add_argument("--random-weights", type=int, default=seed_default, metavar="SEED", help=seed_help)
    return w


def add_filter_arguments(parser: argparse.ArgumentParser, threshold_help: str, no_filter_help: str) -> None:
    """``--filter-threshold T | --no-filter`` for a model with a neural filter (``model.filter``).
    ``threshold_help`` says what T does; the default's source is appended."""
    f = parser.add_mutually_exclusive_group()
    f.add_argument(
        "--filter-threshold",
        type=float,
        default=None,
        metavar="T",
        help=f"{threshold_help} {FILTER_THRESHOLD_DEFAULT}",
    )
    f.add_argument("--no-filter", action="store_true", help=no_filter_help)
