"""A cache of trained dense models: plain state dicts, loaded without unpickling objects."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoprune._files import atomic_write, safe_filename

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """``$AUTOPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoprune``, else ``~/.cache/...``."""
    if os.environ.get("AUTOPRUNE_CACHE_DIR"):
        return Path(os.environ["AUTOPRUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "autoprune"


def cached_model(
    model: nn.Module, key: dict[str, Any], train: Callable[[nn.Module], None]
) -> nn.Module:
    """Load ``model``'s weights from the cache entry named by ``key``, or train and store them.

    ``key`` holds everything that decides the weights (task, architecture, seed, recipe), so
    any change retrains. A corrupt or foreign entry is retrained over, never trusted: it is
    read with ``weights_only=True`` and must match the model's state dict exactly.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / safe_filename(f"{key.get('task', 'model')}-{digest}", ".pt")
    if path.exists():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state, strict=True)
            logger.debug("loaded the dense model from %s", path)
            return model
        except Exception as e:  # corrupt, truncated or foreign: retrain over it
            logger.warning("ignoring unusable cached model %s (%s); retraining", path, e)
    train(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())  # a concurrent reader sees the old or the whole new
    logger.info("trained the dense model and cached it at %s", path)
    return model
