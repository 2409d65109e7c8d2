"""Several processes, one job: the process group that ``torchrun`` sets up, and the few
collective operations training and generation use.

``torchrun --nproc-per-node N [--nnodes M ...] -m caloforge train ...`` starts N×M copies
of the command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in
their environment. :func:`init_from_environment` joins them into one process group (the
``gloo`` backend on CPU, ``nccl`` on CUDA, each process on GPU ``LOCAL_RANK``); without
those variables it does nothing and every function here is the single-process identity,
so the code that calls them never asks whether it runs distributed.

Conventions (docs/distributed.md): rank 0 is the *main* process, the only one that writes
files or prints progress; every process runs the same collectives in the same order (a
decision one process takes alone, such as "the time budget is spent", is agreed on with
:func:`any_rank` before anyone acts on it).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import CaloforgeError, OptionError
from .runtime import get_logger

log = get_logger("distributed")
# a collective waits this long for the other processes before giving up (a process that
# died or hangs should end the job, not leave the others waiting for ever)
COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("CALOFORGE_DIST_TIMEOUT_MIN", "30")))


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on
    its node. ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process job (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def current_world() -> World:
    """The process group this process belongs to (``World()`` when none was started)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_environment(device: str) -> tuple[World, str]:
    """Join the job ``torchrun`` started, if any: returns (world, this process's device).

    ``device`` is the resolved device of the command (``cpu``, ``cuda``, ``cuda:N``): on
    CUDA each process takes GPU ``LOCAL_RANK`` and the ``nccl`` backend, on CPU ``gloo``."""
    import torch
    import torch.distributed as dist

    if not launched_by_torchrun():
        return World(), device
    if not dist.is_available():
        raise CaloforgeError("this torch build has no torch.distributed; run one process")
    _end_with_launcher()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise OptionError(f"distributed runs need --device cpu or cuda, not {device!r}")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
        except (RuntimeError, ValueError) as exc:
            raise CaloforgeError(f"could not join the torchrun job ({backend}): "
                                 f"{str(exc).splitlines()[0]}") from None
    world = current_world()
    log.debug("rank %d of %d on %s (%s)", world.rank, world.size, device, backend)
    return world, device


def _end_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its launcher dies. torchrun starts each
    process in a session of its own, so a ``kill -9`` of torchrun alone would leave them
    training on (and writing) without it; with this they stop like a terminated run: the
    epoch in progress is lost, the last checkpoint is whole, ``--resume`` goes on."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def shutdown() -> None:
    """Leave the process group (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> str:
    """Where tensors of a collective must be: the current GPU for nccl, else the CPU."""
    import torch
    import torch.distributed as dist

    return f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"


def all_reduce_sum(values: list[float]) -> list[float]:
    """The element-wise sum of ``values`` over the processes (float64)."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """The element-wise maximum of ``values`` over the processes."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: list[float], operation: str) -> list[float]:
    import torch
    import torch.distributed as dist

    if not current_world().distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, operation))
    return [float(v) for v in tensor.cpu()]


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on at least one."""
    return all_reduce_max([float(flag)])[0] > 0


def average_gradients(parameters: list[Any], loss: Any) -> Any:
    """Data-parallel synchronisation of one optimiser step: the gradients of
    ``parameters`` and the step's ``loss`` (a 0-d tensor) averaged over the processes in
    one all-reduce (missing gradients count as zero). A non-finite loss on any process
    makes the averaged loss non-finite on all, so that all skip the step together.
    Returns the averaged loss."""
    import torch
    import torch.distributed as dist

    world = current_world()
    if not world.distributed:
        return loss
    device = _collective_device()
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(device)
              for p in parameters]
    flat = torch.cat(pieces + [loss.detach().reshape(1).to(device, pieces[0].dtype
                                                              if pieces else torch.float32)])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad = flat[offset:offset + count].view_as(parameter).to(parameter.device)
        offset += count
    return flat[-1].cpu()


def broadcast_module(module: Any, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (only its buffers: e.g. normalisation
    statistics, which each process updates from its own batches) into every process's
    ``module``."""
    import torch.distributed as dist

    if not current_world().distributed:
        return
    device = _collective_device()
    tensors = list(module.buffers()) if buffers_only else \
        list(module.parameters()) + list(module.buffers())
    for tensor in tensors:
        if device == "cpu" or tensor.device.type == "cuda":
            dist.broadcast(tensor.data, src=0)
        else:
            copy = tensor.data.to(device)
            dist.broadcast(copy, src=0)
            tensor.data.copy_(copy)


def check_in_sync(module: Any) -> None:
    """Raise a CaloforgeError on every process if the processes' weights of ``module``
    differ (they must not: every process takes the same averaged step)."""
    import torch

    if not current_world().distributed:
        return
    with torch.no_grad():
        fingerprint = sum(float(p.detach().double().sum()) + float(p.detach().double().abs()
                                                                  .sum())
                          for p in module.parameters())
    high, negative_low = all_reduce_max([fingerprint, -fingerprint])
    if high != -negative_low:
        raise CaloforgeError("the processes' weights differ after training (a bug: please "
                             "report it); train with one process")


def broadcast_bytes(payload: bytes | None) -> bytes:
    """Rank 0's ``payload`` on every process (others pass None)."""
    import torch
    import torch.distributed as dist

    if not current_world().distributed:
        assert payload is not None
        return payload
    device = _collective_device()
    size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64,
                        device=device)
    dist.broadcast(size, src=0)
    if payload is not None and current_world().is_main:
        buffer = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().numpy().tobytes())


def broadcast_object(value: Any) -> Any:
    """Rank 0's JSON-serialisable ``value`` on every process (JSON, not pickle)."""
    if not current_world().distributed:
        return value
    payload = json.dumps(value).encode() if current_world().is_main else None
    return json.loads(broadcast_bytes(payload))


def from_main(function: Any, *args: Any) -> Any:
    """Run ``function(*args)`` on rank 0 only and give its (JSON-serialisable) result to
    every process; a
    :class:`CaloforgeError` it raises is raised on every process (so that no process waits
    for a collective the others will never reach)."""
    outcome: list[Any] | None = None
    if current_world().is_main:
        try:
            outcome = ["ok", function(*args)]
        except CaloforgeError as exc:
            outcome = ["error", str(exc)]
    outcome = broadcast_object(outcome)
    assert outcome is not None
    if outcome[0] == "error":
        raise CaloforgeError(outcome[1])
    return outcome[1]


def barrier() -> None:
    """Wait until every process gets here."""
    import torch.distributed as dist

    if current_world().distributed:
        dist.barrier()


def rank_part(items: Any, world: World) -> Any:
    """This rank's share of ``items`` (a sequence or array): ``world.size`` near-equal
    consecutive slices, disjoint and covering every item."""
    n = len(items)
    return items[world.rank * n // world.size:(world.rank + 1) * n // world.size]
