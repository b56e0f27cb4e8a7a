"""Runners of the evaluating subcommands: `quality`, `prepare`, `demo`, `eval` (the I/O halves of ``eval_plans``)."""

from __future__ import annotations

from diffswarm.cli.eval_plans import DemoPlan, EvalPlan, EvalReportPlan, PreparePlan, QualityPlan


def run_quality(p: QualityPlan) -> int:
    import numpy as np
    import torch

    from diffswarm.data import Partition
    from diffswarm.eval import get_classifier, quality_report
    from diffswarm.training.jobs import dataset_for_partition

    data = np.load(p.samples)
    samples, labels = torch.from_numpy(data["samples"]), torch.from_numpy(data["labels"])
    part = Partition.load(p.partition) if p.partition else None
    if part is not None:
        train, test = dataset_for_partition(part), dataset_for_partition(part, "test")
    else:
        train, test = p.data.load("train"), p.data.load("test")
    clf = get_classifier(train)
    rep = quality_report(samples, labels if (labels >= 0).any() else None, train, test, clf, part)
    print(rep.format())
    return 0


def run_prepare(p: PreparePlan) -> int:
    """Train (or find cached) the classifier the demo on this machine scores with: its preset's epochs, all cores."""
    import time

    from diffswarm.eval import get_classifier
    from diffswarm.eval.classifier import cached_classifier, classifier_path
    from diffswarm.experts.train import pick_device
    from diffswarm.training.presets import PRESETS, device_preset

    epochs = PRESETS[device_preset(pick_device("auto").type)].classifier_epochs  # the demo's preset here
    train, test = p.data.load("train"), p.data.load("test")
    path, t0 = classifier_path(train), time.time()
    clf = cached_classifier(train, epochs=epochs) if train.num_classes else None  # load and check the file once
    if clf is not None:
        how = "already cached"
        if clf.test_accuracy is None:  # a classifier cached without its test accuracy (`quality` trains so)
            clf.config.test_accuracy = clf.accuracy(test)
    else:  # trains (or refuses an unlabeled dataset)
        clf = get_classifier(train, epochs=epochs, progress=False, test_ds=test)
        how = f"trained in {time.time() - t0:.0f} s ({clf.config.epochs} epochs)"
    print(f"quality classifier for {train.dataset_id}: test accuracy {100 * (clf.test_accuracy or 0):.1f}%, {how} "
          f"-> {path} (the demo, `diffswarm eval` and `quality` load it from there)")
    return 0


def run_demo(p: DemoPlan) -> int:
    from diffswarm.demo import run_demo as demo

    demo(p.config)
    return 0


def run_eval(p: EvalPlan | EvalReportPlan) -> int:
    if isinstance(p, EvalReportPlan):
        return run_eval_report(p)
    from diffswarm.eval.run import run_study

    run_study(p.config, command=p.command)
    return 0


def run_eval_report(p: EvalReportPlan) -> int:
    from diffswarm.eval.report import rerender

    print(f"report -> {rerender(p.out)}")
    return 0
