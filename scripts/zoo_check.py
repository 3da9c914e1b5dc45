"""Structured pruning of torchvision models: MACs, parameters, latency and accuracy.

Builds torchvision's ResNet-18 and MobileNetV3-Small from their constructors (random weights,
10 classes: nothing is downloaded), trains each briefly on scikit-learn's digits upsampled to
3x32x32, and prunes it at a few channel sparsities through the public trial path
(:func:`autoprune.prune_and_finetune` with a structured policy: one L1 ratio for every channel
group, kept counts rounded to ``--round-to``), then fine-tunes it. For each sparsity it prints
the MACs (and whether they equal :func:`autoprune.pruning.sizes.predict_macs`), the parameters,
the latency ratio dense/pruned (interleaved medians, batch 32, one thread) and the validation
accuracy before and after fine-tuning, and after fine-tuning with the BatchNorm statistics
recalibrated on the training images (a short fine-tune leaves them behind the weights).

Needs torchvision built for the installed torch (``pip install torchvision``).

    python scripts/zoo_check.py [--models resnet18 mobilenet_v3_small]
        [--sparsities 0.25 0.5 0.75] [--epochs 8] [--finetune-epochs 2] [--train-samples N]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import torch
from torch import nn
from torch.nn import functional as F

from autoprune import Policy, Task, prune_and_finetune
from autoprune.measure import Context, Latency, compare_latency, macs
from autoprune.pruning.sizes import predict_macs
from autoprune.pruning.structured import channel_groups
from autoprune.tasks.digits import digits_split
from autoprune.train import evaluate, fit


def digits_32(
    model: nn.Module, lr: float, finetune_epochs: int, train_samples: int | None = None
) -> Task:
    """The digits task, its 8x8 images upsampled to 32x32 and repeated on 3 channels; the
    first ``train_samples`` training images only, if given."""
    split = {}
    for key, (x, y) in digits_split().items():
        images = torch.from_numpy(x).reshape(-1, 1, 8, 8)
        images = F.interpolate(images, size=32, mode="bilinear").repeat(1, 3, 1, 1)
        labels = torch.from_numpy(y)
        if key == "train" and train_samples is not None:
            images, labels = images[:train_samples], labels[:train_samples]
        split[key] = (images, labels)
    return Task(
        model=model,
        train=split["train"],
        val=split["val"],
        test=split["test"],
        finetune_epochs=finetune_epochs,
        lr=lr,
        batch_size=32,
        name="digits-32",
    )


def recalibrate_batchnorm(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> None:
    """Set the running statistics of ``model``'s BatchNorms to their averages over ``images``
    (the weights as they are now), and leave the model in eval mode.

    A few hundred training steps leave the statistics behind the weights (they start at 0 and
    1, far from a fresh network's), and with a 1x1 last feature map the eval-mode outputs
    collapse to one class while the train-mode outputs are right.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, help="train on the first N images only")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="threads for training")
    args = parser.parse_args()
    import torchvision.models  # here: the module doc says what to install

    torch.set_num_threads(args.threads)
    latency = Latency(batch_size=32, threads=1, repeats=15, warmup=3)
    for name in args.models:
        torch.manual_seed(0)
        model = getattr(torchvision.models, name)(weights=None, num_classes=10)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1  # MobileNetV3's 0.01 is for ImageNet's many steps
        task = digits_32(model, args.lr, args.finetune_epochs, args.train_samples)
        start = time.perf_counter()
        fit(model, task, epochs=args.epochs, seed=0)
        recalibrate_batchnorm(model, task.train[0])
        example = task.val[0][:1]
        dense_macs = macs(model, Context(example, ()))
        dense_params = sum(p.numel() for p in model.parameters())
        groups = channel_groups(model, task.val[0][:2])
        print(
            f"\n{name}: {len(groups)} channel groups, {dense_params / 1e6:.2f}M params, "
            f"{dense_macs / 1e6:.1f}M MACs, val accuracy {evaluate(model, task, 'val')[0]:.3f} "
            f"after {args.epochs} epochs ({time.perf_counter() - start:.0f} s)"
        )
        print(
            f"{'sparsity':>8} {'MACs':>8} {'MACs x':>7} {'= pred':>6} {'params':>8} "
            f"{'latency x':>9} {'acc pruned':>10} {'acc tuned':>9} {'BN recal':>8}"
        )
        for ratio in args.sparsities:
            policy = Policy(
                {g.name: ratio for g in groups},
                criterion="l1",
                granularity="structured",
                round_to=args.round_to,
            )
            untuned = prune_and_finetune(
                dataclasses.replace(task, finetune_epochs=0), policy, seed=0
            )
            tuned = prune_and_finetune(task, policy, seed=0)
            assert tuned.plan is not None
            pruned = tuned.model.eval()
            pruned_macs = macs(pruned, Context(example, ()))
            predicted = predict_macs(model, tuned.plan, task.val[0][:2])
            dense_ms, pruned_ms = compare_latency([copy.deepcopy(model), pruned], example, latency)
            recalibrate_batchnorm(pruned, task.train[0])
            recalibrated = evaluate(pruned, task, "val")[0]
            print(
                f"{ratio:>8.2f} {pruned_macs / 1e6:>7.2f}M {dense_macs / pruned_macs:>6.2f}x "
                f"{'yes' if predicted == pruned_macs else 'NO':>6} "
                f"{sum(p.numel() for p in pruned.parameters()) / 1e6:>7.2f}M "
                f"{dense_ms / pruned_ms:>8.2f}x {untuned.metrics['accuracy']:>10.3f} "
                f"{tuned.metrics['accuracy']:>9.3f} {recalibrated:>8.3f}"
            )


if __name__ == "__main__":
    main()
