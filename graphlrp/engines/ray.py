"""`explain` and `evaluate` on Ray: the same per-image work as the local commands, spread over a cluster.

* explain: Ray Data reads the image files; an actor pool of `graphlrp.load(...)` sessions (one per worker, with
  onnxruntime's threads set to the CPUs the worker reserved, or one GPU per worker with `--provider cuda`)
  preprocesses and explains batches with the same `ExplainerSession` methods the local command uses, and writes the
  same per-image files. The driver collects one row per image into a Parquet table.
* evaluate: each method's maps are Ray tasks over chunks of images that start and end on the local run's batch
  boundaries (so every model call sees the same batch as locally), and the insertion/deletion curves go to an
  actor pool, each actor holding one forward session.

Ray is not a scheduler we write: placement, retries and data movement are Ray's. Importing this module imports Ray.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path

from ..errors import GraphLRPError

try:
    import ray
    import ray.data
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise GraphLRPError("--ray needs Ray: pip install 'graphlrp[ray]' (ray[data] and pyarrow)") from e

PARQUET_NAME = "explanations.parquet"


def start(address: str | None) -> dict[str, float]:
    """Connect to the Ray cluster at `address` ("" or None: $RAY_ADDRESS, else a Ray started here for this run)
    unless this process is already connected; returns the cluster's resources."""
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=True)
        except (ConnectionError, ValueError, RuntimeError) as e:
            where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
            raise GraphLRPError(f"cannot connect to Ray at {where}: {e}") from e
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its INFO/WARNING lines are about Ray, not the run
    return ray.cluster_resources()


def worker_count(resources: dict[str, float], workers: int | None, threads: int, gpus: bool) -> int:
    """`workers` if given, else one per GPU (gpus) or as many as the cluster's CPUs allow at `threads` each."""
    if workers:
        return workers
    if gpus:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // threads)


# --- explain -------------------------------------------------------------------------------------------------------

class _ExplainWorker:
    """One actor of the pool: an onnxruntime session, and the local command's preprocessing and output writing."""

    def __init__(self, model: str, provider: str, threads: int, target, out: str,
                 names: dict[str, tuple[int, str, str]],  # absolute path -> (input index, path as given, stem)
                 figure: bool = False, cmap: str | None = None, labels: list[str] | None = None):
        from ..runtime import load

        self.session = load(model, providers=provider, threads=threads if provider == "cpu" else None)
        if labels is not None:
            self.session.set_labels(labels)
        self.target, self.out, self.names = target, Path(out), names
        self.figure, self.cmap = figure, cmap

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from ..explain_files import describe, load_image, write_outputs
        from ..errors import ImageError

        rows = {"index": [], "image": [], "predicted": [], "target": [], "probability": [], "relevance_sum": [],
                "message": [], "warning": [], "skipped": []}
        good, arrays, warnings, photos = [], [], [], []
        for data, path in zip(batch["bytes"], batch["path"]):
            index, shown, _ = self.names[_key(path)]
            try:
                array, warning, photo = load_image(self.session, bytes(data), shown)
            except ImageError as e:
                _add(rows, index, shown, -1, -1, float("nan"), float("nan"), f"skipped {e}", "", True)
                continue
            arrays.append(array)
            photos.append(photo)
            good.append(path)
            warnings.append(warning or "")
        if arrays:
            explained = self.session.run_each(*self.session.prepare(np.stack(arrays), self.target))
            for path, warning, photo, exp in zip(good, warnings, photos, explained):
                index, shown, stem = self.names[_key(path)]
                if isinstance(exp, Exception):  # its relevance is not finite: this image is skipped, not the batch
                    _add(rows, index, shown, -1, -1, float("nan"), float("nan"), f"skipped {shown}: {exp}", "", True)
                    continue
                write_outputs(self.out, stem, exp, self.session, photo, figure=self.figure, cmap=self.cmap)
                _add(rows, index, shown, exp.predicted, exp.target, float(exp.probabilities[exp.target]),
                     float(exp.relevance.sum(dtype=np.float64)), f"{shown}: {describe(self.session, exp)}", warning,
                     False)
        return {k: np.asarray(v) for k, v in rows.items()}


def _add(rows: dict, *values) -> None:
    for key, value in zip(rows, values):
        rows[key].append(value)


def _key(path: str) -> str:
    """Ray Data reports local files by absolute path without a scheme; key the inputs the same way."""
    return os.path.abspath(path)


def explain(model: str, paths: list[str], stems: dict[str, str], out: Path, *, target, provider: str | None,
            batch_size: int, address: str | None, workers: int | None, threads: int, figure: bool = False,
            cmap: str | None = None, labels: list[str] | None = None) -> tuple[int, int]:
    """Explain `paths` on Ray, writing the local command's files per image plus `explanations.parquet`.
    Prints one line per image (skips on stderr); returns (explained, skipped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..errors import ImageError
    from ..runtime import open_image

    resources = start(address)
    gpus = provider == "cuda" or (provider is None and resources.get("GPU", 0) > 0)
    provider = "cuda" if gpus else "cpu"
    n_workers = worker_count(resources, workers, threads, gpus)
    skipped, readable, names = 0, [], {}
    for index, path in enumerate(paths):
        if not os.path.isfile(path):  # Ray Data fails the whole read on a missing file: report it as locally
            try:
                open_image(path)
            except ImageError as e:
                print(f"skipped {e}", file=sys.stderr)
                skipped += 1
                continue
        names[_key(path)] = (index, path, stems[path])
        readable.append(_key(path))
    rows = []
    if readable:
        # reading is I/O: it takes no CPU from the actors, and as many concurrent readers as there are workers
        # (num_cpus=0 alone would let Ray start a reader process per file)
        ds = ray.data.read_binary_files(readable, include_paths=True, num_cpus=0, concurrency=n_workers)
        ds = ds.map_batches(_ExplainWorker, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=n_workers),
                            num_cpus=0 if gpus else threads, num_gpus=1 if gpus else 0,
                            fn_constructor_kwargs={"model": str(model), "provider": provider, "threads": threads,
                                                   "target": target, "out": str(out), "names": names,
                                                   "figure": figure, "cmap": cmap, "labels": labels})
        for row in ds.iter_rows():
            if row["warning"]:
                print(row["warning"], file=sys.stderr)
            print(row["message"], file=sys.stderr if row["skipped"] else sys.stdout, flush=True)
            skipped += bool(row["skipped"])
            if not row["skipped"]:
                rows.append(row)
    rows.sort(key=lambda r: r["index"])
    table = pa.table({"image": [str(r["image"]) for r in rows], "predicted": [int(r["predicted"]) for r in rows],
                      "target": [int(r["target"]) for r in rows],
                      "probability": [float(r["probability"]) for r in rows],
                      "relevance_sum": [float(r["relevance_sum"]) for r in rows]})
    pq.write_table(table, out / PARQUET_NAME)
    print(f"Ray: {n_workers} worker(s) ({provider}, {threads if not gpus else 'GPU'} per worker); "
          f"table in {out / PARQUET_NAME}", file=sys.stderr)
    return len(rows), skipped


# --- evaluate ------------------------------------------------------------------------------------------------------

def _share_user_modules() -> None:
    """A model from `file.py:factory` lives in a module the workers cannot import; pickle it by value instead."""
    from ray import cloudpickle  # Ray's own copy: the standalone package's registry is not the one Ray uses

    for name, module in list(sys.modules.items()):
        if name.startswith("graphlrp_user_model_"):
            cloudpickle.register_pickle_by_value(module)


def _maps_task(model, example, batch_size, cam_layer, box, method_name, x, pred, size, threads):
    """One method's maps on a chunk of images, computed as the local run computes them."""
    import torch

    from ..evaluate import methods as registry
    from ..evaluate.runner import source_maps

    torch.set_num_threads(threads)
    ctx = registry.Context(model, example, batch_size=batch_size, cam_layer=cam_layer, box=box)
    t = time.perf_counter()
    try:
        maps = source_maps(ctx, registry.METHODS[method_name], x, pred, size)
    except registry.Unavailable as e:
        return None, str(e), ctx.notes, 0.0
    return maps, None, ctx.notes, time.perf_counter() - t


class _CurveWorker:
    """Insertion/deletion curves for chunks of images with one forward session, built once per actor."""

    def __init__(self, model, example, mean, std, step, batch_size, threads):
        import torch

        from ..evaluate.metrics import InsertionDeletion

        torch.set_num_threads(threads)
        self.evaluator = InsertionDeletion(model, example, mean, std, step, batch_size=batch_size, threads=threads)

    def curves(self, images, labels, maps):
        before = self.evaluator.model_calls
        return self.evaluator.curves(images, labels, maps), self.evaluator.model_calls - before, self.evaluator.backend


class RayEvaluateEngine:
    """`graphlrp evaluate --ray`: maps as Ray tasks, curves on an actor pool. Same interface as
    `evaluate.runner.LocalEngine`."""

    name = "ray"

    def __init__(self, resources: dict[str, float], workers: int | None = None, threads: int = 1):
        self.threads = threads
        self.workers = worker_count(resources, workers, threads, gpus=False)
        self._model_ref = None

    def _model(self, model):
        if self._model_ref is None:
            _share_user_modules()
            self._model_ref = ray.put(model)
        return self._model_ref

    def maps(self, ctx, x, pred, methods, size):
        from ..evaluate.runner import MapsOutcome

        model = self._model(ctx.model)
        batches = math.ceil(len(x) / ctx.batch_size)
        per_chunk = math.ceil(batches / min(batches, self.workers)) * ctx.batch_size  # whole local batches
        task = ray.remote(num_cpus=self.threads)(_maps_task)
        pending = {source: [task.remote(model, ctx.example, ctx.batch_size, ctx.cam_layer, ctx.box, method.name,
                                        x[i:i + per_chunk], pred[i:i + per_chunk], size, self.threads)
                            for i in range(0, len(x), per_chunk)]
                   for source, method in methods.items()}
        import torch

        out = {}
        for source, refs in pending.items():
            parts = ray.get(refs)
            for _, _, notes, _ in parts[:1]:  # every chunk notes the same things
                for key, texts in notes.items():
                    for text in texts:
                        if text not in ctx.notes.get(key, []):
                            ctx.note(key, text)
            failed = next((reason for _, reason, _, _ in parts if reason), None)
            out[source] = MapsOutcome(None if failed else torch.cat([m for m, _, _, _ in parts]), failed,
                                      sum(s for *_, s in parts))
        return out

    def curves(self, model, data, maps, ev, batch_size, example):
        from ray.util import ActorPool

        from ..evaluate.runner import MASK_BUDGET, join_curves

        h, w = data.images.shape[-2:]
        local_chunk = max(1, MASK_BUDGET // (len(maps) * 2 * ev.points * h * w))
        chunk = max(1, min(local_chunk, math.ceil(len(data) / (4 * self.workers))))
        worker = ray.remote(num_cpus=self.threads)(_CurveWorker)
        model_ref = self._model(model)
        actors = [worker.remote(model_ref, example, ev.mean, ev.std, ev.step, batch_size, self.threads)
                  for _ in range(self.workers)]
        try:
            jobs = [(data.images[i:i + chunk], data.labels[i:i + chunk], {n: m[i:i + chunk] for n, m in maps.items()})
                    for i in range(0, len(data), chunk)]
            results = list(ActorPool(actors).map(lambda actor, job: actor.curves.remote(*job), jobs))
        finally:
            for actor in actors:
                ray.kill(actor)
        ev.model_calls += sum(calls for _, calls, _ in results)
        backends = sorted({backend for _, _, backend in results})
        ev.notes.setdefault("insertion/deletion", []).append(
            f"model calls for the curves ran on {', '.join(backends)}, {self.workers} Ray worker(s) with "
            f"{self.threads} thread(s) each")
        return join_curves([c for c, _, _ in results])
