"""Distributed set-up, done once: torchrun's environment -> rank, world size, device, gathers.

torchrun (and the Kubeflow PyTorchJob operator through the ``PET_*`` variables torchrun reads)
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. :func:`setup` reads them,
initialises the process group when the world has more than one process (NCCL on CUDA, gloo on
CPU) with a configurable timeout, and returns a :class:`DistEnv`. Everything else receives that
object; code runs unchanged as a single plain process without a process group.

A lost peer surfaces in the next collective. NCCL and the c10d store raise
``torch.distributed.DistError`` subclasses (DistBackendError, DistNetworkError, DistStoreError).
gloo (measured with torch 2.14.1) raises a plain ``RuntimeError`` whose message starts with the
gloo transport source that failed: ``[.../gloo/transport/tcp/pair.cc:545] Read error ...
Connection reset by peer`` when a peer's process dies, ``[.../gloo/transport/tcp/
unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation`` when it hangs past the
timeout. :func:`collectives` marks a region that runs collectives (under DDP the gradient
all-reduce runs inside ``backward()``, so the region is the whole step) and raises those two
kinds, and only those (:func:`is_peer_failure`), as :class:`CollectiveError`. Every other
exception raised there (a shape error, a CUDA or cuDNN error, out of memory, a user error)
passes through with its own type and traceback.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stablerep.devices import resolve_device
from stablerep.errors import ConfigError, PeerLostError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


#: What every gloo transport error message holds: the path of the gloo source that raised it.
GLOO_TRANSPORT = "gloo/transport/"
#: gloo's messages that carry no source path: a pair closed after a collective's timeout
#: (seen in DDP's buffer broadcast when a peer hangs, torch 2.14), and a peer's socket closing.
GLOO_PEER_MESSAGES = ("Application timeout caused pair closure", "Connection closed by peer")


class CollectiveError(PeerLostError, RuntimeError):
    """A collective failed: a peer died, stopped responding past the timeout, or the
    connection between ranks broke. Exits with the "peer lost" status (a retryable one)."""


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a failed collective rather than a bug or a user error.

    True for ``torch.distributed.DistError`` and its subclasses, and for gloo's transport
    errors (a ``RuntimeError`` whose message names a ``gloo/transport/`` source, or is one of
    :data:`GLOO_PEER_MESSAGES`); False for everything else, a ``RuntimeError`` of a shape
    mismatch or of CUDA included.
    """
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return type(error) is RuntimeError and (
        GLOO_TRANSPORT in text or any(message in text for message in GLOO_PEER_MESSAGES))


@contextlib.contextmanager
def collectives(env: DistEnv) -> Iterator[None]:
    """A region of collective calls (forward/backward under DDP, gathers, reductions).

    In a distributed job a peer failure raised inside it (:func:`is_peer_failure`) is raised
    as :class:`CollectiveError` from it; any other exception, and everything in a
    single-process run, passes through unchanged.
    """
    if not env.distributed:
        yield
        return
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as e:  # DistError and gloo's errors are RuntimeErrors
        if not is_peer_failure(e):
            raise
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CollectiveError(f"{type(e).__name__}: {first}") from e


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}: got {raw!r}, expected an integer"
                          ) from None


def setup(device: str = "auto", *, timeout_s: float = 600.0) -> DistEnv:
    """Read torchrun's variables, pick the device, initialise the process group if needed.

    Args:
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda``.
        timeout_s: collective timeout; a dead peer fails the job after this instead of
            hanging it forever.
    """
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world}")
    use_cuda = resolve_device(device, field="train.device").startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = f"cuda:{local_rank}"
    else:
        dev = "cpu"
    if world == 1:
        return DistEnv(rank, 1, local_rank, dev, None)
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise ConfigError(f"{var} is not set; launch with torchrun (or set it)")
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=torch.device(dev) if use_cuda else None)
    log.info("distributed: rank %d/%d (local %d) on %s via %s", rank, world, local_rank, dev,
             backend)
    return DistEnv(rank, world, local_rank, dev, backend)


def teardown() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank-major); gradients flow back when ``x`` has one.

    The backward pass of the autograd all-gather sums, over ranks, the gradient each rank's
    loss sends to this rank's slice, so a loss over the gathered batch trains every rank's
    encoder as one process on the whole batch would.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    if x.requires_grad:
        from torch.distributed.nn.functional import all_gather as autograd_all_gather

        return torch.cat(autograd_all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(value: float, device: str = "cpu") -> float:
    """The mean of a float over ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def all_reduce_sum(value: float, device: str = "cpu") -> float:
    """The sum of a number over ranks (exact for integers below 2**53)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (rows may differ in number between ranks) from every rank, rank-major.

    Args:
        x: (n_r, ...) on this rank; the trailing shape and dtype must agree over ranks.

    Returns:
        (sum of n_r, ...), no gradient.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    counts = all_gather(torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device))
    most = int(counts.max())
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = all_gather(padded).view(len(counts), most, *x.shape[1:])  # (world, most, ...)
    return torch.cat([parts[r, : int(n)] for r, n in enumerate(counts)], dim=0)
