"""hnd.bench: what the split buys, measured (``hnd-bench``), and the codec / bottleneck-size figures.

Modules, in the order a run uses them:

* ``plan``: options, the settings every frame goes through (split per bits, offload, local, filter
  twins) and ``plan()``, the resolved run (defaults, weights, filter threshold, the server's config).
* ``frames``: the frames in memory (folder, video, sample photos, ``--mixed`` synthetic scenes).
* ``measure``: the server (``hnd.server.local``), every frame through every setting, ``Sample`` per run,
  compute pooling.
* ``agreement``: IoU-matched F1 against local mode's detections.
* ``linkmodel``: the deterministic link model applied to measured message sizes.
* ``summary``: per-setting summaries, bandwidth sweeps and the whole run as dataclasses; ``to_json`` is
  the one serialiser (results.json).
* ``report``: results.md, the plots, the machine header (from the JSON form).
* ``run``: ``run_bench``, one run end to end; ``cli``: ``hnd-bench``'s arguments and ``main``.
* ``codec``, ``sizes``: ``python -m hnd.bench.codec`` / ``python -m hnd.bench.sizes`` figures.
"""
