"""The kNN check that training runs every ``train.knn_every`` steps, as a callback.

Training never imports evaluation code: :func:`stablerep.stages.run_training` builds a
:class:`KnnCheck` and hands it to the trainer, which calls it with its current backbone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stablerep.distributed import DistEnv, all_gather_rows, all_reduce_sum, collectives
from stablerep.evaluation.backbones import Backbone
from stablerep.evaluation.classifiers import knn_predict
from stablerep.evaluation.datasets import EvalData, ImageList, check_names, load_dataset
from stablerep.evaluation.features import extract

KNN_K = 20  # neighbours voting in the check


class KnnCheck:
    """kNN top-1 of a backbone on one evaluation data set, shared over the ranks.

    Every rank extracts the features of its share of both splits (every world_size-th
    image), so no rank waits in a collective while another works; the train features are
    gathered, each rank votes for its test share, and the correct votes are summed.
    """

    def __init__(self, dataset: str, *, seed: int, image_size: int, env: DistEnv):
        """Check the data set name now; the data loads on the first call.

        Args:
            dataset: an ``eval.datasets`` name, e.g. ``sklearn:digits``.
            seed: the split seed of the data set.
            image_size: the backbone's input size.
            env: this process's rank and world size.

        Raises:
            ConfigError: ``dataset`` is not a known data set name.
        """
        check_names([dataset])
        self.dataset, self.seed, self.image_size, self.env = dataset, seed, image_size, env
        self._data: EvalData | None = None

    def _share(self, images: ImageList) -> ImageList:
        rank, world = self.env.rank, self.env.world_size
        return ImageList(images.labels[rank::world], lambda i: images.load(rank + i * world))

    def __call__(self, model: nn.Module, info: dict[str, Any], *,
                 amp_dtype: torch.dtype | None) -> float:
        """The kNN top-1 accuracy of ``model`` (the same value on every rank).

        Args:
            model: the backbone (leaves it in eval mode; the caller switches back).
            info: its model info (timm_model, image_size, feature_dim ...).
            amp_dtype: autocast dtype for extraction (None = full precision).
        """
        env = self.env
        if self._data is None:
            self._data = load_dataset(self.dataset, seed=self.seed)
        backbone = Backbone(model, info, "training", "training")
        kwargs = dict(image_size=self.image_size, batch_size=256, device=env.device,
                      amp_dtype=amp_dtype, num_workers=0)
        train = extract(backbone, self._share(self._data.train), desc="knn train", **kwargs)
        test = extract(backbone, self._share(self._data.test), desc="knn test", **kwargs)
        d = int(info["feature_dim"])
        with collectives(env):
            train_x = all_gather_rows(torch.from_numpy(train.x).reshape(-1, d).to(env.device))
            train_y = all_gather_rows(torch.from_numpy(train.y).to(env.device))
            correct = 0
            if len(test.y) and len(train_y):  # on the training device, like the gather
                pred = knn_predict(train_x, train_y, torch.from_numpy(test.x).to(env.device),
                                   classes=len(self._data.classes), k=KNN_K)
                correct = int((pred.cpu().numpy() == test.y).sum())
            correct = all_reduce_sum(correct, env.device)
            total = all_reduce_sum(len(test.y), env.device)
        return correct / max(total, 1)
