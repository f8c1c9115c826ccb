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


# ---------------------------------------------------------------------------------------------
# The shared vocabulary of the nine console scripts (#24 row 14): one definition of --config,
# --device and --log-level, one way to show a default (HelpFormatter) and one way to name a default
# that comes from the config (config_default).

# The bundled config a tool uses when --config is not given (hnd-edge, hnd-demo, hnd-server).
DEFAULT_CONFIG = "hnd/faster_rcnn-b3ch"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
DEVICE_METAVAR = "{auto,cpu,cuda,cuda:N}"


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` of every hnd CLI: each flag shows its default, appended as ``(default: X)`` unless its
    help already names it. Flags whose default comes from the config say so in their help
    (:func:`config_default`), since their parser default is None."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if action.nargs == 0 or default is None or default is argparse.SUPPRESS or "%(default)" in text:
            return text
        if default_named(text, default):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def default_named(text: str, default: object) -> bool:
    """Whether a help text already names its default (``(default 20)`` names 20.0 too)."""
    shown = {str(default)} | ({f"{default:g}"} if isinstance(default, float) else set())
    return "default" in text and any(s in text for s in shown)


def config_key(key: str) -> str:
    """``the config's runtime.KEY (V when it sets none)``: a config value a flag's default comes from,
    with the value a config without that key gives (hnd.common.config.RuntimeConfig)."""
    from hnd.common.config import RuntimeConfig  # here, not at the top: hnd-healthcheck imports this module numpy-free

    value = getattr(RuntimeConfig(), key)
    shown = f"{value:g}" if isinstance(value, float) else value
    return f"the config's runtime.{key} ({shown} when it sets none)"


def config_default(key: str) -> str:
    """Help text for a flag whose default is the config's ``runtime.KEY``: ``(default: ...)``."""
    return f"(default: {config_key(key)})"


def add_config_argument(
    parser: argparse.ArgumentParser, *, required: bool = False, default: str | None = DEFAULT_CONFIG, note: str = ""
) -> None:
    """``--config FILE_OR_NAME``: a YAML file or the name of a bundled config (``configs/`` without
    ``.yaml``). ``note`` says what the tool takes when it is not given, where that is not ``default``."""
    text = "YAML config file, or the name of a bundled config (e.g. hnd/faster_rcnn-b3ch: the path under configs/)"
    parser.add_argument(
        "--config",
        required=required,
        default=None if required else default,
        metavar="CONFIG",
        help=f"{text}{'; ' + note if note else ''}",
    )


def device_name(text: str) -> str:
    """argparse type of ``--device``: auto, cpu, cuda or cuda:N (hnd.common.build.pick_device resolves it)."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is not a device: give auto, cpu, cuda or cuda:N")


def add_device_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--device {auto,cpu,cuda,cuda:N}`` of the tools that run torch (hnd-server, hnd-train, hnd-eval)."""
    parser.add_argument(
        "--device",
        type=device_name,
        default=default,
        metavar=DEVICE_METAVAR,
        help="torch device: auto = cuda when one is available, else cpu",
    )


def add_log_level_argument(parser: argparse.ArgumentParser, default: str) -> None:
    """``--log-level`` (case-insensitive) of the long-running tools."""
    parser.add_argument(
        "--log-level",
        type=str.upper,
        default=default,
        choices=LOG_LEVELS,
        help="logging threshold of the process's log lines on stderr",
    )


def add_bits_argument(parser: argparse.ArgumentParser, default: int | None, note: str = "") -> None:
    """``--bits {0,2,4,6,8,16,32}`` of the tools that send a bottleneck (hnd-edge, hnd-demo)."""
    from hnd.common import codec  # here, not at the top: hnd-healthcheck imports this module numpy-free

    parser.add_argument(
        "--bits",
        type=int,
        default=default,
        choices=(codec.LEARNED_BITS, *codec.BITS),
        help="bottleneck bits: 2-8 quantized, 16 float16, 32 lossless, 0 an Entropic Student's learned coding"
        + (f" {note}" if note else ""),
    )
