"""hnd-export-head: write only the head's weights of a student checkpoint, for edge devices.

    hnd-export-head student.pt head.pt

The export carries the full model's fingerprint, so the server still recognises the edge.
"""
from __future__ import annotations

import argparse
import sys

from hnd.common.checkpoint import export_head
from hnd.common.errors import USER_ERRORS, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hnd-export-head", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="full student checkpoint (ours or the original's)")
    p.add_argument("output", help="head-only file to write (atomically)")
    args = p.parse_args(argv)
    try:
        fp = export_head(args.checkpoint, args.output)
    except USER_ERRORS as exc:
        return report("hnd-export-head", exc)
    print(f"{args.output}: head of model {fp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
