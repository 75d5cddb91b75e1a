"""Natural classifier training on Ray Train, with the EBM run's machinery: DDP workers, a
checkpoint per epoch (model, optimizer, schedule, history), restarts of failed workers, resume by
name, one MLflow run with the final classifier as a model. Each worker takes its share of every
batch; the epoch order and the augmentation come from the seed, so a resumed run repeats an
uninterrupted one.
"""
from __future__ import annotations

import tempfile

import numpy as np
import ray
import torch

from ..config import TrainClassifierConfig
from ..method.pixels import unit_range_hwc
from ..method.training import classifier_optimizer, new_classifier, run_classifier
from ..recipes.training import preflight_classifier
from ..store import storage
from ..store.checkpoints import load_classifier, load_classifier_training, save_classifier, save_classifier_training
from ..store.data import ImageSet, read_images
from ..store.tracking import log_torch_model
from .cluster import check_one_storage, connect
from .ray_train import (
    WorkerProgress,
    fit_tracked,
    mean_over_workers,
    prepare_model,
    run_dir,
    worker_device,
    worker_logger,
)


def classifier_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainClassifierConfig.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(config)
    pixels, labels = ray.get(config["train"][0])
    clf = new_classifier(cfg).to(device)
    opt, sched = classifier_optimizer(cfg, clf)
    epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            epoch, history = load_classifier_training(d, clf, opt, sched, missing_ok=False)
    model = prepare_model(clf, config) if world > 1 else clf
    logger = worker_logger(config, rank)
    test = None
    if rank == 0 and config.get("test"):
        tp, tl = ray.get(config["test"][0])
        test = ImageSet(unit_range_hwc(np.array(tp)), torch.from_numpy(np.array(tl)), torch.arange(len(tp)))
    steps = -(-len(labels) // cfg.batch_size)
    bar = WorkerProgress(config, rank, cfg.epochs * steps, f"train-classifier:{cfg.name}", start=epoch * steps)

    def on_epoch(epoch, history):
        metrics = {k: v for k, v in history[-1].items() if v is not None}
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_classifier_training(d, cfg, epoch, clf, opt, sched, history)
                save_classifier(clf, storage.join(run_dir(cfg), "classifier.pt"), epoch=epoch)
                if logger:
                    logger.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)

    run_classifier(cfg, model, opt, sched, epoch, history,
                   lambda r: (unit_range_hwc(pixels[r.numpy()]), torch.from_numpy(labels[r.numpy()])), len(labels),
                   rank=rank, world=world, device=device, test=test, classifier=clf,
                   on_step=lambda m: bar.update(1, loss=m["loss"]), on_epoch=on_epoch,
                   reduce=lambda values: mean_over_workers(values, world, device))
    bar.close()


def train_classifier_on_ray(cfg: TrainClassifierConfig) -> dict:
    """Fit the classifier with a TorchTrainer; returns the last metrics and the classifier's URL."""
    data = read_images(cfg.data)
    test = read_images(cfg.test_data) if cfg.test_data is not None else None
    preflight_classifier(cfg, data, test)  # labels, output, MLflow: before Ray starts
    connect(cfg.ray.address)
    check_one_storage(cfg.output, "output", cfg.ray.shared_filesystem)
    config = {"cfg": cfg.model_dump(mode="json"),
              "train": [ray.put((data.pixels(), data.labels.numpy()))],
              "test": [ray.put((test.pixels(), test.labels.numpy()))] if test is not None else None}
    url = storage.join(run_dir(cfg), "classifier.pt")

    def log_final():
        c = cfg.classifier
        clf = load_classifier(c.arch, url, c.num_classes, c.mean, c.std, c.wrn_depth, c.wrn_widen)
        log_torch_model(clf, "classifier", tuple(data.data.shape[1:]))

    result = fit_tracked(classifier_loop, cfg, config, "train-classifier", log_final)
    if result.error:
        raise result.error
    return {**(result.metrics or {}), "classifier": url,
            "checkpoint": result.checkpoint.path if result.checkpoint else None}
