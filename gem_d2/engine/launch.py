"""Multi-process launcher and DDP wrapping that work on CPU (gloo) and CUDA (NCCL).

detectron2 v0.6's ``launch`` asserts CUDA and always uses NCCL, and its ``create_ddp_model`` always
passes ``device_ids``, which DDP rejects for CPU modules. These replacements keep detectron2's
contract (``comm.get_rank/get_local_rank/get_world_size`` work in the workers) on both devices.

On CPU, ``num_gpus_per_machine`` means the number of worker *processes* per machine (each gets
``cores // processes`` intra-op threads); on CUDA it is the number of GPUs, one process each.
"""
from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DEFAULT_TIMEOUT", "launch", "resolve_device", "create_ddp_model", "unwrap_model"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    """``"cuda"`` or ``"cpu"`` for a launcher device spec: ``auto`` = cuda if available, ``cpu``, ``cuda[:i]``."""
    device = str(device).lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"launch(device={device!r}): expected 'auto', 'cpu' or 'cuda' (MODEL.DEVICE)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"launch(device={device!r}): CUDA is not available on this machine; "
                           "set MODEL.DEVICE cpu to run on CPU (gloo)")
    return kind


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(main_func: Callable, num_gpus_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", args: Sequence = (), timeout: timedelta = DEFAULT_TIMEOUT,
           device: str = "auto") -> None:
    """Run ``main_func(*args)`` in ``num_gpus_per_machine`` processes on this machine (detectron2's signature).

    Args:
        main_func: a picklable (module-level) function; called once per process.
        num_gpus_per_machine: processes on this machine: GPUs on CUDA, worker processes on CPU.
        num_machines, machine_rank: multi-machine layout (this machine's rank).
        dist_url: ``tcp://host:port`` / ``file://...`` rendezvous, or ``auto`` (a free localhost port,
            single machine only).
        args: arguments of ``main_func``.
        timeout: collective timeout of the process group.
        device: ``auto`` (CUDA when available), ``cpu`` (gloo) or ``cuda`` (NCCL); pass ``MODEL.DEVICE``.

    World size 1 runs ``main_func`` in this process without a process group, as detectron2 does.
    """
    if num_gpus_per_machine < 1 or num_machines < 1:
        raise ValueError(f"launch: num_gpus_per_machine={num_gpus_per_machine} and num_machines={num_machines} "
                         "must both be >= 1")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"launch: machine_rank={machine_rank} must be in [0, {num_machines})")
    kind = resolve_device(device)
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if kind == "cuda" and num_gpus_per_machine > torch.cuda.device_count():
        raise RuntimeError(f"launch: {num_gpus_per_machine} processes per machine requested but only "
                           f"{torch.cuda.device_count()} CUDA devices are visible")
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("launch: dist_url='auto' only works on one machine; pass tcp://host:port")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_distributed_worker, nprocs=num_gpus_per_machine, daemon=False,
             args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, tuple(args), timeout, kind))


def _distributed_worker(local_rank: int, main_func: Callable, world_size: int, num_gpus_per_machine: int,
                        machine_rank: int, dist_url: str, args: tuple, timeout: timedelta, kind: str) -> None:
    global_rank = machine_rank * num_gpus_per_machine + local_rank
    if kind == "cuda":
        torch.cuda.set_device(local_rank)  # before NCCL init, so collectives use this rank's GPU
    else:
        # Each process would otherwise start one thread per core and they would fight over the cores.
        torch.set_num_threads(max(1, _cpu_cores() // num_gpus_per_machine))
    backend = "nccl" if kind == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logger.error(f"Process group init failed: backend={backend}, url={dist_url}, rank={global_rank}")
        raise
    try:
        # detectron2's comm.get_local_rank/get_local_size need the per-machine group.
        num_machines = world_size // num_gpus_per_machine
        for i in range(num_machines):
            ranks = list(range(i * num_gpus_per_machine, (i + 1) * num_gpus_per_machine))
            group = dist.new_group(ranks)
            if i == machine_rank:
                comm._LOCAL_PROCESS_GROUP = group
        comm.synchronize()
        main_func(*args)
    finally:
        comm._LOCAL_PROCESS_GROUP = None
        if dist.is_initialized():
            dist.destroy_process_group()


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wrap ``model`` in DDP when there are several processes; ``device_ids`` only for CUDA modules.

    ``find_unused_parameters`` stays False: gem_d2's MoE layers make every expert take part in the
    graph of every step (experts a batch does not route to contribute ``0 * params``), so every
    parameter receives a (possibly zero) gradient on every rank and DDP's reducer never waits.
    """
    if comm.get_world_size() == 1:
        return model
    device = next(model.parameters()).device
    if device.type == "cuda" and "device_ids" not in kwargs:
        kwargs["device_ids"] = [device.index if device.index is not None else comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model
