"""The evaluation engine on Ray Data: EOT-replicated purify-and-attack passes spread over an actor pool.

The driver only chooses the images' ids (the subset, less those with records): it reads the parquet
file's id and label columns, never the pixels. Ray Data reads the file on the cluster
(`read_parquet`, the image, label and index columns, filtered to the chosen ids), decodes the image
bytes in its tasks and splits them into blocks of `batch_size` rows, before any actor starts. Then
`map_batches` runs `AttackActor` (one per GPU, or per `cpus_per_actor` CPUs), which loads the
classifier and the EBM once, makes floats of the uint8 pixels on its device and runs the
single-process `Attack` on each batch, writing the batch's records atomically under
`output/records/`. Each image's randomness is keyed by (seed, image id), so the result for an image
does not depend on its batch or on which actor ran it. A rerun skips images with records (and refuses
records written with other settings, before any work). A lost actor or node fails the pass; the
recipe (`recipes.attack.run_attack`) runs it again on the images still without a record, so a fault costs at
most the batches in flight. Bad input fails in the recipe's preflight, before any actor starts.
"""
from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import sys
import time
import warnings

import numpy as np
import pyarrow as pa
import torch

from ..config import AttackConfig
from ..errors import JobFailed
from ..method.devices import job_device
from ..method.pixels import unit_range
from ..recipes.attack import Rerun, build_attack, dtype_of
from ..results import records as results
from ..store.data import Catalog, DataError, ImageSet, arrow_filesystem, catalog, decode, image_bytes
from .cluster import available, check_one_storage, connect
from .devices import Plan, capacity, cluster_plan, pool_limit, ready
from .ray_private import unserializable_lost


class AttackActor:
    """Holds the classifier and the EBM; attacks one batch of rows per call."""

    def __init__(self, cfg: dict, settings: dict, threads: int | None = None, gradient_ids=()):
        if threads:
            torch.set_num_threads(threads)
        self.cfg = AttackConfig.model_validate(cfg)
        self.device = job_device("auto")  # Ray sets CUDA_VISIBLE_DEVICES for an actor with a GPU
        self.attack = build_attack(self.cfg, self.device, gradient_ids)
        self.settings = settings
        import ray

        ctx = ray.get_runtime_context()
        self.actor, self.node = ctx.get_actor_id() or "", ctx.get_node_id()
        self.restarted = ctx.was_current_actor_reconstructed  # its first batch is the one it held when lost

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # uint8 N x H x W x C pixels (Ray hands out read-only arrays: copy them), floats made on the device
        pixels = torch.from_numpy(np.array(batch["image"], dtype=np.uint8)).permute(0, 3, 1, 2)
        images = unit_range(pixels, self.device).to(dtype_of(self.cfg))
        labels = torch.tensor(batch["label"], dtype=torch.int64).to(self.device)
        ids = torch.tensor(batch["index"], dtype=torch.int64).to(self.device)
        records = self.attack(images, labels, ids)
        results.write_part(self.cfg.output, records, self.settings)
        n, restarted, self.restarted = len(records), self.restarted, False
        return {"index": np.array(batch["index"], dtype=np.int64), "broken": np.array([not r.robust for r in records]),
                "image_steps": np.array([r.image_steps for r in records], dtype=np.int64),
                "actor": np.array([self.actor] * n), "node": np.array([self.node] * n),
                "restarted": np.array([restarted] * n)}


def decode_batch(batch: pa.Table, url: str, size: int, indexed: bool) -> dict[str, np.ndarray]:
    """Image bytes -> uint8 N x H x W x C pixels, in a Ray Data task (rows keep their id and label)."""
    blobs = batch.column("img").combine_chunks().field("bytes").to_pylist()
    ids = batch.column("index").to_numpy().astype(np.int64)
    return {"index": ids, "label": batch.column("label").to_numpy().astype(np.int64),
            "image": decode(blobs, size, url, ids, "image id" if indexed else "row")}


def image_dataset(ray, cfg: AttackConfig, todo: Catalog | ImageSet):
    """The chosen images as a Ray Dataset of (index, label, image) in blocks of `batch_size` rows.

    A parquet file with an `index` column is read by Ray Data on the cluster, filtered to the chosen ids
    there; its image bytes are decoded in Ray Data tasks. Where ids are row numbers (no usable `index`
    column), which Ray Data cannot filter on, the driver reads the chosen rows' bytes (not their pixels).
    Images already in memory (torchvision folders) travel as uint8 pixels."""
    from ray.data.expressions import col

    context = ray.data.DataContext.get_current()  # copied into the dataset made here, and the pass made from it
    context.raise_original_map_exception = True  # a DataError stays one (`data_error`)
    # the actor pool grows by one as soon as every actor is busy (each holds one batch) and shrinks only once the
    # images are all handed out (Ray Data's defaults wait for two batches per actor, and shrink below half busy)
    scaling = context.autoscaling_config
    scaling.actor_pool_util_upscaling_threshold, scaling.actor_pool_util_downscaling_threshold = 1.0, 0.0
    if isinstance(todo, Catalog):
        if todo.indexed:
            # one file, one footer: one footer-reading actor (Ray Data 2.60 starts 32 per read, each a process, and
            # reads the setting in the process that plans the read: this one)
            os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
            fs, path = arrow_filesystem(todo.url)
            ds = ray.data.read_parquet(path, filesystem=fs).select_columns(["img", "label", "index"])
            ds = ds.filter(expr=col("index").is_in(todo.ids.tolist()))
        else:
            blobs = image_bytes(todo)
            ds = ray.data.from_items([{"index": int(i), "label": int(y), "img": {"bytes": b}}
                                      for i, y, b in zip(todo.ids.tolist(), todo.labels.tolist(), blobs)])
        ds = ds.map_batches(decode_batch,
                            fn_kwargs={"url": todo.url, "size": cfg.data.image_size, "indexed": todo.indexed},
                            batch_format="pyarrow", batch_size=None)
        return ds.repartition(target_num_rows_per_block=cfg.batch_size)  # a block per batch: the actors share them
    pixels = todo.pixels()
    return ray.data.from_items([{"index": int(i), "label": int(y), "image": x} for i, y, x in
                                zip(todo.ids.tolist(), todo.labels.tolist(), pixels)],
                               override_num_blocks=-(-len(todo) // cfg.batch_size))


def plan_actors(cfg: AttackConfig, batches: int) -> tuple[int, int, float, float, Plan, bool]:
    """(actors to start with, most actors, cpus and gpus per actor, the device plan, whether the cluster grows):
    `ray.gpus_per_actor` GPUs each (null: one where the cluster has or can add GPUs, devices.py), else
    `cpus_per_actor` CPUs. The pool starts with the actors the free resources hold (at least one: waited for,
    bounded, where the autoscaler is adding its node) and grows up to `ray.actors`, or as many as the cluster can
    hold (its alive nodes and those its autoscaler may add; every batch its actor where the autoscaler does not
    say), never more than there are batches."""
    devices = cluster_plan(cfg.ray.gpus_per_actor, "ray.gpus_per_actor")
    gpus, cpus = devices.gpus, cfg.ray.cpus_per_actor
    most = max(1, min(cfg.ray.actors or pool_limit({"CPU": cpus, "GPU": gpus}, capacity()) or batches, batches))
    grows = ready(cpus, gpus, {"CPU": "ray.cpus_per_actor", "GPU": "ray.gpus_per_actor"}, cfg.ray.provision_timeout_s,
                  "attack", grow_to=most)  # what no node can hold refused, the first node waited for, more asked
    fit = int(available("GPU") // gpus) if gpus else int(available("CPU") // cpus)
    return max(1, min(fit, most)), most, cpus, gpus, devices, grows


class NodeLosses:
    """The actors a job lost, counted per node and hour: the actors of one node lost within a minute are one
    loss; more than `limit` losses within any hour end the job (a spot cluster loses a node now and then, a
    broken one loses them all the time). Kept by the executor across passes."""

    MERGE_S, WINDOW_S = 60.0, 3600.0

    def __init__(self, limit: int, clock=time.monotonic):
        self.limit, self.clock = limit, clock
        self.events: list[tuple[float, str]] = []  # (when, node) of each loss
        self.where: dict[str, str] = {}  # actor -> the node of its last batch
        self.redone = 0  # batches run again by a restarted actor

    def batch(self, actor: str, node: str, restarted: bool, images: int) -> str | None:
        """Note an actor's finished batch; a restarted actor's first is the batch it held when it was lost (run
        again; an actor lost between two batches held none, and its next is counted so): then the line to print,
        after counting the loss (`JobFailed` past the limit)."""
        lost_on, self.where[actor] = self.where.get(actor), node
        if not restarted:
            return None
        self.redone += 1
        where = f"node {lost_on}" if lost_on else "a node (before its first batch)"
        return self.lost(lost_on or f"actor {actor}", f"an actor was lost on {where}; restarted on node {node}, "
                                                     f"it ran the batch it held again ({images} images)")

    def lost(self, node: str, what: str) -> str:
        """Count a loss on `node` (`what` happened); the line saying it, or `JobFailed` past the limit."""
        now = self.clock()
        if not any(n == node and now - t < self.MERGE_S for t, n in self.events):
            self.events.append((now, node))
        recent = sum(now - t < self.WINDOW_S for t, _ in self.events)
        line = f"{what}; {recent} loss(es) in the last hour (ray.max_failures = {self.limit} per hour)"
        if recent > self.limit:
            raise JobFailed(f"{line}: too many, stopping. The records written stay; the same command continues "
                            "with the images without one")
        return line


# what a lost actor or node raises; anything else (bad data, a bug) would recur, and is not retried
LOST = ("ActorDiedError", "ActorUnavailableError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
        "WorkerCrashedError", "ObjectReconstructionFailedError", "RayActorError", "LocalRayletDiedError")


def error_chain(err: BaseException | None):
    """`err` and every error it wraps, each once: its `__cause__`, its `__context__` and Ray's `cause` (what a
    task's error carries), followed through all of them."""
    todo, seen = [err], set()
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        todo += [getattr(err, "cause", None), err.__context__, err.__cause__]  # popped: __cause__ first


def lost(err: BaseException | None) -> bool:
    """Whether `err` or an error it wraps says an actor, a node or an object was lost (a task's error that wraps
    one is an instance of it too: RayTaskError(ActorDiedError) subclasses ActorDiedError)."""
    import ray.exceptions

    kinds = tuple(getattr(ray.exceptions, n) for n in LOST)
    return any(isinstance(e, kinds) or unserializable_lost(e, LOST) for e in error_chain(err))  # the latter: Ray
    # Data's reader lost an actor and could not rebuild its error


@contextlib.contextmanager
def quiet_task_errors():
    """Ray Data logs a failed task's trace before raising it; the engine raises it itself (a DataError as
    one line), so the trace is printed only with --verbose."""
    log = logging.getLogger("ray.data")
    level = log.level
    if os.environ.get("DEBM_VERBOSE") != "1":
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def data_error(err: BaseException | None) -> DataError | None:
    """The `DataError` a Ray Data task raised, if `err` or an error it wraps is one."""
    for e in error_chain(err):
        if type(e) is DataError:  # not Ray's wrapper, which prints the trace; Ray appends its retry advice
            return DataError(str(e).splitlines()[0])
    return None


def run_pipeline(ray, cfg: AttackConfig, todo, settings: dict, on_batch, losses: NodeLosses,
                 gradient_ids=()) -> None:
    """One pass of Ray Data over `todo`, `on_batch(images, broken)` per finished batch, `losses` counting the
    actors lost on the way (their batches run again on the restarted actors)."""
    batches = -(-len(todo) // cfg.batch_size)
    start, most, cpus, gpus, devices, grows = plan_actors(cfg, batches)
    print(f"attack:{cfg.attack.name}: {start} actor(s) on {devices.where}"
          + (f", growing to {most} as the cluster holds them" if most > start else ""), file=sys.stderr, flush=True)
    try:
        # the images are read and decoded before the actors start: Ray Data's reading asks for CPUs (its file
        # listing always for one) that actors holding every CPU of the cluster would never free; the pixels
        # (uint8) are small beside the attack's cost, and stay on the cluster's object stores
        try:
            with quiet_task_errors():
                images = image_dataset(ray, cfg, todo).materialize()
        except Exception as err:  # an image that does not decode: the data's one-line error, before any attack
            raise data_error(err) or err
        try:
            ran = _stream(ray, cfg, images, settings, on_batch, losses, start, most, cpus, gpus, gradient_ids)
        except BaseException as err:
            release_frames(err)
            raise
    finally:
        if grows:  # the nodes asked for the pool's growth (`plan_actors`); Ray Data asks for its own while it runs
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=[])
    print(f"attack:{cfg.attack.name}: {ran['batches']} batch(es) on {len(ran['nodes'])} node(s) by "
          f"{len(ran['actors'])} actor(s); {ran['redone']} run again after a lost actor", file=sys.stderr, flush=True)


def _stream(ray, cfg, images, settings, on_batch, losses, start, most, cpus, gpus, gradient_ids) -> dict:
    """The pass proper, in a frame of its own: finished by the time its error reaches run_pipeline, so that
    `release_frames` can clear what it holds (the dataset; a running frame cannot be cleared). An actor holds one
    batch at a time (a lost one costs that batch); the pool grows as `image_dataset` set. Returns the batches,
    nodes and actors that ran them, and the batches run again."""
    with warnings.catch_warnings():  # Ray 2.60 takes max_restarts only as a deprecated extra keyword
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        out = images.map_batches(
            AttackActor, fn_constructor_kwargs={"cfg": cfg.model_dump(mode="json"), "settings": settings,
                                                "threads": max(1, int(cpus)), "gradient_ids": list(gradient_ids)},
            batch_size=cfg.batch_size, batch_format="numpy", num_cpus=cpus, num_gpus=gpus,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=most, initial_size=start,
                                               max_tasks_in_flight_per_actor=1),
            max_restarts=-1, max_task_retries=-1)  # restarted where it can be placed; its batch run there again
    ran = {"batches": 0, "nodes": set(), "actors": set(), "redone": 0}
    redone = losses.redone
    for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
        actor, node = str(batch["actor"][0]), str(batch["node"][0])
        line = losses.batch(actor, node, bool(batch["restarted"][0]), len(batch["index"]))
        if line:
            print(f"attack:{cfg.attack.name}: {line}", file=sys.stderr, flush=True)
        ran["batches"] += 1
        ran["nodes"].add(node)
        ran["actors"].add(actor)
        on_batch(len(batch["index"]), int(batch["broken"].sum()))
    ran["redone"] = losses.redone - redone
    return ran


GENERATOR = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def release_frames(err: BaseException) -> None:
    """Clear the locals of the finished frames that a failed pass's error reaches (its traceback's, those of the
    errors it wraps, and their callers, Ray Data's scheduling thread among them), then run the cycle collector:
    those frames hold the pass's tasks, whose callbacks hold its actors, so the actors and their CPUs or GPUs are
    released while the caller still holds the error. A frame that another thread is still running is cleared once
    that thread has left it, waiting at most 30 s. The traceback's lines stay; this thread's running frames and
    callers that are generators are left as they are."""
    mine, frame = set(), sys._getframe()
    while frame is not None:
        mine.add(id(frame))
        frame = frame.f_back
    deadline = time.monotonic() + 30.0
    while _clear_frames(err, mine) and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()  # what the cleared frames held in reference cycles (Ray Data's operators), long past gen 0 by now


def _clear_frames(err: BaseException, mine: set[int]) -> int:
    """One sweep of `release_frames`; returns how many frames other threads were still running."""
    seen, running = set(), 0
    for e in error_chain(err):
        tb = e.__traceback__
        while tb is not None:
            frame, raised = tb.tb_frame, True
            while frame is not None and id(frame) not in seen:
                seen.add(id(frame))
                # a caller (f_back) that is a generator may live on: of those, clear only frames the error
                # passed through
                if id(frame) not in mine and (raised or not frame.f_code.co_flags & GENERATOR):
                    try:
                        frame.clear()
                    except RuntimeError:  # still running in another thread
                        running += 1
                frame, raised = frame.f_back, False
            tb = tb.tb_next
    return running


class RayActors:
    """The attack's Ray executor: each pass over the images without a record runs on an elastic Ray Data actor pool
    (`run_pipeline`) of the cluster at `ray.address`; a lost actor is restarted and runs its batch again. A pass
    that fails on a loss all the same leaves the records written, and the recipe runs it again on the images
    without one. Losses are counted per node and hour across passes (`NodeLosses`). The driver builds its attack
    on the CPU (preflight, gallery) and logs to MLflow."""

    device, tracking = "cpu", True

    def __init__(self):
        self.losses: NodeLosses | None = None

    def images(self, cfg: AttackConfig) -> Catalog | ImageSet:
        return catalog(cfg.data)  # a catalog: the cluster reads the pixels

    def run(self, cfg: AttackConfig, todo, settings: dict, attack, gradient_ids, on_batch, reruns: int) -> None:
        ray = connect(cfg.ray.address)
        check_one_storage(cfg.output, "output", cfg.ray.shared_filesystem)
        self.losses = self.losses or NodeLosses(cfg.ray.max_failures)
        try:
            run_pipeline(ray, cfg, todo, settings, on_batch, self.losses, gradient_ids=gradient_ids)
        except Exception as err:  # noqa: BLE001 - only losses are run again; the rest is raised as it is
            if not lost(err):
                raise
            line = self.losses.lost(f"pass {reruns}", f"the pass failed on a loss ({type(err).__name__})")
            raise Rerun(f"{line}; running again on the images without a record") from err
