"""What a text-to-image backend is given and must do: :class:`WorkItem` and :class:`Backend`.

Its own module so that the backends (``backends.py`` for diffusers, ``procedural.py`` for
the grammar renderer) and the shard runner share the interface without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class WorkItem:
    """One image to draw: image ``j`` of caption ``caption_id``."""

    caption_id: int
    caption: str
    j: int
    seed: int


class Backend(Protocol):
    """What the shard runner needs from a text-to-image model."""

    model_id: str  # recorded in every sample's metadata

    def generate(self, items: list[WorkItem]) -> np.ndarray:
        """Draw one image per item: (len(items), H, W, 3) uint8."""
        ...
