"""A built-in transformer task: a small Hugging Face BERT reads the digits as pixel tokens.

Each 8×8 digit is a sequence of a ``[CLS]`` token and its 64 pixel intensities (tokens 0 to
16, the digits' own levels), classified by ``BertForSequenceClassification``. Batches are
Hugging Face dicts (``input_ids``, ``labels``) and the model computes its own loss, so the
task goes through the same hooks a user's transformer does. The model is built from a config
(nothing is downloaded) and trained once per seed, then cached like the other built-in tasks.

A transformer has no notion of a pixel's neighbours, and 1,078 training images are few to
learn one from, so two choices in the initialisation (part of the recipe, hence of the cache
key) make it learn in a dozen epochs: the position embeddings start as 2-D sines and cosines of
each pixel's row and column, and the intensity embeddings start mostly along one direction in
the order of their levels (dark to bright). Everything is trained after that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from autoprune.errors import TaskError
from autoprune.task import Task
from autoprune.tasks._cache import cached_model
from autoprune.tasks.digits import _SPLIT_SEED, digits_split
from autoprune.train import fit

LEVELS = 17  # the digits' intensities 0..16: one token each
CLS = LEVELS  # the [CLS] token
SEQUENCE = 1 + 64
# The architecture: small enough to train on a CPU in tens of seconds, with heads and neurons
# enough for structured pruning to choose from.
_LAYERS, _HIDDEN, _HEADS, _INTERMEDIATE = 2, 64, 4, 128
_INIT_RANGE = 0.2  # BERT's 0.02 leaves the embeddings too faint to learn from in a few epochs
_POSITION_SCALE, _ORDER = 0.2, 0.9  # see the module doc
# Dense training recipe; a change here changes the cache key and retrains.
_EPOCHS, _LR, _BATCH_SIZE, _WEIGHT_DECAY, _WARMUP = 12, 2e-3, 32, 1e-2, 0.1
# Fine-tuning recipe of every trial (a spec may override epochs and lr): the learning rate
# decays linearly to zero, without which a trained model's accuracy drops while it recovers.
_FINETUNE_EPOCHS, _FINETUNE_LR = 2, 1e-3


def tokens(pixels: Any) -> Tensor:
    """``[CLS]`` and the 64 intensity tokens of each digit (``pixels`` in [0, 1], as
    :func:`autoprune.tasks.digits.digits_split` gives them)."""
    levels = torch.as_tensor(pixels).mul(16).round().long().reshape(-1, 64)
    return torch.cat([torch.full((len(levels), 1), CLS), levels], dim=1)


def digits_bert_model() -> nn.Module:
    """A 2-layer BERT (hidden 64, 4 heads of 16, FFN 128, no dropout) over the 18 tokens, with
    a 10-class head (77k parameters, 70k of them in the 13 Linear layers that are pruned)."""
    try:
        from transformers import BertConfig, BertForSequenceClassification
    except ImportError:
        raise TaskError(
            "task 'digits-bert' needs transformers: pip install 'autoprune[hf]'"
        ) from None

    config = BertConfig(
        vocab_size=LEVELS + 1,
        hidden_size=_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        intermediate_size=_INTERMEDIATE,
        max_position_embeddings=SEQUENCE,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        initializer_range=_INIT_RANGE,
        num_labels=10,  # a PretrainedConfig keyword, which mypy does not see in BertConfig
    )  # type: ignore[call-arg]
    model = BertForSequenceClassification(config)
    embeddings = model.bert.embeddings
    with torch.no_grad():
        embeddings.position_embeddings.weight.copy_(_POSITION_SCALE * _grid_positions(_HIDDEN))
        words = embeddings.word_embeddings.weight
        direction = torch.randn(_HIDDEN)
        direction *= _INIT_RANGE * math.sqrt(_HIDDEN) / direction.norm()
        ramp = torch.linspace(-1.0, 1.0, LEVELS)[:, None] * direction
        words[:LEVELS] = (1 - _ORDER) * words[:LEVELS] + _ORDER * ramp
    return model


def _grid_positions(width: int) -> Tensor:
    """Sines and cosines of each pixel's row (first half) and column (second half); zero for
    the ``[CLS]`` position."""
    quarter = width // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(quarter) / quarter)
    table = torch.zeros(SEQUENCE, width)
    rows, cols = torch.arange(64).div(8, rounding_mode="floor"), torch.arange(64) % 8
    for i, coord in enumerate((rows, cols)):
        angles = coord[:, None].float() * freqs
        table[1:, 2 * i * quarter : (2 * i + 1) * quarter] = torch.sin(angles)
        table[1:, (2 * i + 1) * quarter : (2 * i + 2) * quarter] = torch.cos(angles)
    return table


def digits_bert(*, seed: int = 0) -> Task:
    """The digits BERT task (dict batches, the model's own loss), trained once per seed and
    cached."""
    split = {
        key: {"input_ids": tokens(x), "labels": torch.from_numpy(y)}
        for key, (x, y) in digits_split().items()
    }
    with torch.random.fork_rng(devices=[]):  # seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        model = digits_bert_model()
    task = Task(
        model=model,
        train=split["train"],
        val=split["val"],
        test=split["test"],
        finetune_epochs=_FINETUNE_EPOCHS,
        lr=_FINETUNE_LR,
        scheduler=linear_decay,
        name="digits-bert",
    )

    def train(m: nn.Module) -> None:
        # On one thread, as the other digits tasks: the same seed gives the same weights.
        recipe = dataclasses.replace(
            task, lr=_LR, batch_size=_BATCH_SIZE, optimizer=_adamw, scheduler=_one_cycle
        )
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.random.fork_rng(devices=[]):
                fit(m, recipe, epochs=_EPOCHS, seed=seed)
        finally:
            torch.set_num_threads(threads)

    key = {
        "task": "digits-bert",
        "seed": seed,
        "split_seed": _SPLIT_SEED,
        "arch": repr(model),
        "init": [_INIT_RANGE, _POSITION_SCALE, _ORDER],
        "recipe": [_EPOCHS, _LR, _BATCH_SIZE, _WEIGHT_DECAY, _WARMUP],
        "threads": 1,
    }
    cached_model(model, key, train)
    model.eval()
    return task


def _adamw(params: Iterable[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=_WEIGHT_DECAY)


def linear_decay(optimizer: torch.optim.Optimizer, steps: int) -> Any:
    """The learning rate falls linearly from the task's to zero over the ``steps``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)


def _one_cycle(optimizer: torch.optim.Optimizer, steps: int) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=_LR, total_steps=steps, pct_start=_WARMUP
    )
