"""hnd-bench's measurement: every frame through every setting against a real server, as Samples.

A ``Sample`` is one frame through one setting, made from the ``EdgeRunner`` record (the same record
``hnd-edge`` writes); ``pool_compute`` swaps each run's network compute for the mode's per-frame median.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from hnd.common.split import split_model
from hnd.common.timing import ms_since, now_ns
from hnd.edge.api import make_mode
from hnd.edge.capture import ArrayFrames
from hnd.edge.client import EdgeError, SplitClient
from hnd.edge.pipeline import EdgeRunner
from hnd.edge.records import FrameRecord
from hnd.server.local import answered_requests, background_server, scrape_answered_requests, server_process

from hnd.bench.frames import resize_like_model, scale_boxes
from hnd.bench.linkmodel import Link, link_latency_ms
from hnd.bench.plan import PROG, Setting


@dataclass
class Sample:
    """One frame through one setting: sizes, times and agreement with the reference.

    ``*_raw`` times are this run's; ``edge_ms`` / ``server_ms`` (what the link model uses) are the same with
    the model's compute replaced by its median over every run of this mode on this frame (``pool_compute``).
    """

    frame: int
    source: str
    raw_bytes: int  # H * W * 3 of the original frame
    request_bytes: int
    payload_bytes: int
    response_bytes: int
    edge_ms_raw: float  # preprocess + head (local: whole model) + encode (+ resize)
    edge_model_ms_raw: float  # the network's share of it: head (split), whole model (local), 0 (offload)
    server_ms_raw: float  # decode + queue + compute + encode, as the server reports them
    server_compute_ms_raw: float  # the network's share of it: tail (split), whole model (offload)
    loopback_ms: float
    measured_total_ms: float  # the edge's own end-to-end time on loopback
    edge_ms: float = 0.0
    server_ms: float = 0.0
    f1: float | None = None
    filtered: bool | None = None  # None: no filter ran; True: the filter dropped the frame (nothing sent)
    filter_probability: float | None = None
    filter_ms_raw: float = 0.0  # the filter's share of edge_ms_raw

    def __post_init__(self) -> None:
        self.edge_ms = self.edge_ms or self.edge_ms_raw
        self.server_ms = self.server_ms or self.server_ms_raw

    def latency_ms(self, link: Link, local: bool, raw: bool = False) -> float:
        """Modeled end-to-end latency over ``link``; the edge time alone for local mode and dropped frames."""
        edge, server = (self.edge_ms_raw, self.server_ms_raw) if raw else (self.edge_ms, self.server_ms)
        if local or self.filtered:
            return edge
        return link_latency_ms(edge, self.request_bytes, self.response_bytes, server, self.loopback_ms, link)


def sample_from_record(record: FrameRecord, frame: int, raw_bytes: int, extra_edge_ms: float) -> Sample:
    """A Sample from an EdgeRunner record (the same typed record hnd-edge writes).

    A frame the neural filter dropped (``filtered: true``) has 0 bytes, no server times and no response:
    its edge time is preprocess + stem (its ``ms.head``) + filter, and that is its whole latency.
    """
    if not record.ok:
        raise EdgeError(f"frame {frame} ({record.source}): {record.status}: {record.error or ''}")
    ms = record.ms
    server = record.server_ms
    server_ms = server.total() if server is not None else 0.0
    return Sample(
        frame=frame,
        source=record.source,
        raw_bytes=raw_bytes,
        request_bytes=record.bytes.message,
        payload_bytes=record.bytes.payload,
        response_bytes=record.bytes.response or 0,
        edge_ms_raw=ms.edge_ms() + extra_edge_ms,
        edge_model_ms_raw=ms.get("head"),
        server_ms_raw=server_ms,
        server_compute_ms_raw=server.compute if server is not None else 0.0,
        loopback_ms=max(0.0, ms.get("network_server") - server_ms) if server is not None else 0.0,
        measured_total_ms=ms.get("total") + extra_edge_ms,
        filtered=record.filtered,
        filter_probability=record.filter_probability,
        filter_ms_raw=ms.get("filter"),
    )


def pool_compute(settings: list[Setting], samples: dict[str, list[Sample]]) -> None:
    """Give every run of a mode, per frame, the median network compute of that mode's runs on that frame.

    Whatever the codec setting, a mode runs the same network on the same frame (split: the head here, the
    tail there; offload: the whole model there; local: the whole model here), so its time differs between
    settings only by machine noise: on a shared 2-core machine +-40 %, more than most differences under
    study. Pooling keeps the settings' real differences (codec / image encode and decode, bytes) and drops
    that noise, and a per-mode "best setting" no longer picks whichever run was lucky. Raw times stay in
    ``*_raw``.

    With the neural filter the same holds per kind of work: the head (stem + encoder) of every run that
    encoded the frame, the stem alone of the runs whose filter dropped it, the filter of every run that ran
    it, and the tail of every run the server computed. A dropped frame has no server time.
    """

    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else 0.0

    for mode in ("split", "offload", "local"):
        runs = [samples[s.key] for s in settings if s.mode == mode]
        for per_frame in zip(*runs):
            kept = [x for x in per_frame if not x.filtered]
            dropped = [x for x in per_frame if x.filtered]
            head = median([x.edge_model_ms_raw for x in kept])
            stem = median([x.edge_model_ms_raw for x in dropped])
            filt = median([x.filter_ms_raw for x in per_frame if x.filtered is not None])
            server_compute = median([x.server_compute_ms_raw for x in kept])
            for x in per_frame:
                edge = x.edge_ms_raw - x.edge_model_ms_raw + (stem if x.filtered else head)
                if x.filtered is not None:
                    edge += filt - x.filter_ms_raw
                x.edge_ms = edge
                x.server_ms = 0.0 if x.filtered else x.server_ms_raw - x.server_compute_ms_raw + server_compute


def parse_server_profile(text: str) -> dict[str, float]:
    """``"split=23.3,offload=21.2"`` -> {"split": 23.3, "offload": 21.2}: server compute ms per frame by mode."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            ms = float(value)
        except ValueError:
            ms = -1.0
        if name not in ("split", "offload") or ms < 0 or name in out:
            raise ValueError(
                f"--server-profile: bad entry {part.strip()!r}; expected split=MS and/or offload=MS "
                "(server compute per frame, e.g. split=23.3,offload=21.2)"
            )
        out[name] = ms
    return out


def apply_server_profile(settings: list, samples: dict[str, list[Sample]], profile: dict[str, float]) -> None:
    """Replace the measured server compute (tail for split, whole model for offload) with ``profile``'s ms.

    Decode, queue and response encoding stay as measured; frames the neural filter dropped have no server
    time. Run after ``pool_compute``: the link model then shows another server's crossovers (e.g. a GPU's).
    """
    for s in settings:
        if s.mode not in profile:
            continue
        for x in samples[s.key]:
            if not x.filtered:
                x.server_ms = x.server_ms_raw - x.server_compute_ms_raw + profile[s.mode]


Measured = tuple[
    dict[str, list[Sample]], dict[str, list[dict]], dict[str, list[dict[str, torch.Tensor]]], dict[str, int]
]


def measure(
    settings: list[Setting],
    frames: list[np.ndarray],
    names: list[str],
    model: torch.nn.Module,
    fp: str,
    client: SplitClient,
    progress: bool,
    answered: Callable[[], float] | None = None,
) -> Measured:
    """Every frame through every setting, frame by frame (settings interleaved, so drift hits all alike).

    Returns per setting key its Samples, the EdgeRunner records, the detections (original frame coordinates)
    and the requests the server answered for it (its ``hnd_requests_total`` before and after each run; empty
    without ``answered``).
    """
    head, _ = split_model(model)
    runners = {s.key: EdgeRunner(s.options, make_mode(s.options, head, fp, model), client) for s in settings}
    samples: dict[str, list[Sample]] = {s.key: [] for s in settings}
    records: dict[str, list[dict]] = {s.key: [] for s in settings}
    detections: dict[str, list[dict[str, torch.Tensor]]] = {s.key: [] for s in settings}
    requests: dict[str, int] = {s.key: 0 for s in settings} if answered is not None else {}
    bar = tqdm(total=len(frames) * len(settings), desc=PROG, unit="run", disable=not progress)
    try:
        step = max(1, len(settings) // len(frames))
        for i, (image, name) in enumerate(zip(frames, names)):
            # Rotate the order per frame so that no setting always runs right after the same neighbour.
            for s in settings[i * step % len(settings) :] + settings[: i * step % len(settings)]:
                bar.set_postfix_str(f"{name}: {s.key}", refresh=False)
                extra_ms, sent = 0.0, image
                if s.resized:
                    t = now_ns()
                    sent = resize_like_model(image, head.transform)
                    extra_ms = ms_since(t)
                runner = runners[s.key]
                got: list[FrameRecord] = []
                before = answered() if answered is not None else 0.0
                runner.run(ArrayFrames([sent], [name]), on_record=lambda r, f, got=got: got.append(r))
                if answered is not None:
                    requests[s.key] += int(round(answered() - before))
                record = got[0]
                dets = runner.last_detections[0]
                if s.resized:
                    dets = scale_boxes(dets, sent.shape[:2], image.shape[:2])
                record.frame = i
                records[s.key].append(record.to_dict())
                samples[s.key].append(sample_from_record(record, i, image.size, extra_ms))
                detections[s.key].append(dets)
                bar.update(1)
    finally:
        bar.close()
    return samples, records, detections, requests


@contextlib.contextmanager
def serving(
    config_path: str, weights: list[str], model: torch.nn.Module, in_process: bool, threads: int
) -> Iterator[tuple[str, str, Callable[[], float]]]:
    """A real hnd-server on loopback; yields (HOST:PORT, description, answered()).

    ``answered()`` reads the server's own count of answered Infer requests (``hnd_requests_total``), so the
    bench can check how many requests each setting really sent.
    """
    if in_process:
        with background_server(model) as server:
            registry = server.service.metrics.registry
            yield (
                f"127.0.0.1:{server.port}",
                "in-process BackgroundServer (shares this process's threads)",
                lambda: answered_requests(registry),
            )
        return
    extra = ["--log-level", "WARNING", "--threads", str(threads), "--max-delay-ms", "0", "--device", "cpu"]
    with server_process(config_path, weights, extra, metrics=True) as proc:
        url = proc.metrics_url
        assert url is not None
        yield (
            proc.target,
            f"hnd-server subprocess, {threads} torch thread(s), --max-delay-ms 0",
            lambda: scrape_answered_requests(url),
        )
