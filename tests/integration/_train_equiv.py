"""One optimizer step on a fixed global batch, as one process or as one rank of a torchrun job.

Used by ``test_train_distributed.py``::

    python _train_equiv.py OUT                                    # one process, whole batch
    python -m torch.distributed.run --nproc_per_node 2 _train_equiv.py OUT   # 2 ranks, gloo

For each method it builds the model with a fixed seed, wraps it as the trainer does
(:func:`~stablerep.training.trainer.wrap_model`: DDP and batch statistics over all ranks),
makes the AdamW of :func:`~stablerep.training.optim.create_optimizer`, and runs
:func:`~stablerep.training.trainer.train_step` on this rank's captions
``[rank * n / world, (rank + 1) * n / world)`` of the same global batch. Rank 0 writes
``OUT/<method>-w<world>.json`` (every rank's loss and their mean) and ``...pt`` (the averaged
gradients seen by the optimizer, and the updated model state).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from stablerep import distributed
from stablerep.config import TrainConfig
from stablerep.data.loader import Batch
from stablerep.models import create_model, create_tokenizer
from stablerep.training.optim import create_optimizer
from stablerep.training.trainer import train_step, wrap_model

N_CAPTIONS, K = 4, 2
METHODS = ("stablerep", "stablerep_plus")


def make_config(method: str) -> TrainConfig:
    return TrainConfig(method=method, model="vit_tiny", image_size=32, head_hidden_dim=64,
                       head_out_dim=32, embed_dim=16, text_width=32, text_layers=1,
                       text_heads=2, text_context=16, images_per_caption=K,
                       captions_per_batch=N_CAPTIONS, device="cpu", num_workers=0)


def global_batch() -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(N_CAPTIONS * K, 3, 32, 32, generator=g)  # caption-major rows
    texts = [f"a photo of thing number {i} on a table" for i in range(N_CAPTIONS)]
    return images, texts


def local_batch(env: distributed.DistEnv) -> Batch:
    images, texts = global_batch()
    per = N_CAPTIONS // env.world_size
    first = env.rank * per
    return Batch(images=images[first * K:(first + per) * K].clone(),
                 labels=torch.arange(per).repeat_interleave(K), texts=texts[first:first + per],
                 caption_ids=torch.arange(first, first + per), index=0)


def one_step(method: str, env: distributed.DistEnv, out: Path) -> None:
    cfg = make_config(method)
    torch.manual_seed(cfg.seed)
    core = create_model(cfg)
    model = wrap_model(core, cfg, env)
    optimizer = create_optimizer(model, cfg, skip=core.no_weight_decay())
    grads: dict[str, torch.Tensor] = {}

    def keep_grads(opt, args, kwargs) -> None:  # after DDP's all-reduce, before the update
        for name, p in core.named_parameters():
            if p.grad is not None:
                grads[name] = p.grad.detach().clone()

    optimizer.register_step_pre_hook(keep_grads)
    tokenizer = create_tokenizer(cfg.text_context) if cfg.uses_text else None
    totals = train_step(model, optimizer, [local_batch(env)], cfg, env, tokenizer=tokenizer)
    losses = [float(totals["loss"])]
    if env.distributed:
        box: list = [None] * env.world_size
        dist.all_gather_object(box, float(totals["loss"]))
        losses = box
    if env.is_main:
        stem = out / f"{method}-w{env.world_size}"
        state = {k: v.detach().clone() for k, v in core.state_dict().items()}
        torch.save({"grads": grads, "state": state}, f"{stem}.pt")
        (out / f"{stem.name}.json").write_text(json.dumps({
            "method": method, "world_size": env.world_size, "rank_losses": losses,
            "mean_loss": sum(losses) / len(losses), "tensors": f"{stem.name}.pt",
            "num_grads": len(grads)}))


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    # collectives wait this long for a rank that lags (both import and build on busy cores)
    env = distributed.setup("cpu", timeout_s=300)
    try:
        for method in METHODS:
            one_step(method, env, out)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main()
