"""Process group, FSDP2 sharding and model loading for training.

One code path for every launch: `torchrun --nproc_per_node=N` sets RANK/WORLD_SIZE; a plain
`python -m ...` becomes a world of one (an in-memory store, no ports). The model is built on the
meta device, wrapped with `fully_shard` per block and at the root, materialised empty, and then
filled from the full state dict that only rank 0 reads from disk (broadcast shard by shard), so
no rank ever holds a randomly initialised copy.

`--zero_stage` maps onto FSDP2 as DeepSpeed's stages map onto what is partitioned:
  3   parameters, gradients and optimizer state sharded; blocks re-gather parameters in backward
      (`reshard_after_forward=True`);
  2   gradients and optimizer state sharded; gathered parameters are kept from forward to
      backward (`reshard_after_forward=False`);
  0/1 replicated: a 2-D mesh (replicate = world, shard = 1), i.e. every rank keeps whole
      parameters and optimizer state and gradients are all-reduced (FSDP2's HSDP with one shard).
Embeddings, final norm and lm_head stay with the root group: tied embeddings must live in one
FSDP group, and the loss reads `lm_head.weight` right after `hidden_states` (the root keeps its
parameters gathered until backward).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

from eeyore.model import Llama
from eeyore.model.pretrained import load_pretrained, resolve_model_dir

from .lora import LoRASpec, add_adapters, initial_adapters


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()


class DeviceError(RuntimeError):
    """The machine has GPUs this process cannot use: stop rather than train on the CPU unnoticed."""


def _gpu_present() -> bool:
    """An NVIDIA driver is loaded and the user did not hide every GPU (CUDA_VISIBLE_DEVICES="" or -1)."""
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1")
    return torch.version.cuda is not None and os.path.exists("/dev/nvidiactl") and not hidden


def training_device(local_rank: int) -> torch.device:
    """This process's device: GPU `LOCAL_RANK` when CUDA works, the CPU when there is no GPU at all."""
    if not torch.cuda.is_available():
        if _gpu_present():
            raise DeviceError(
                "a GPU is installed but torch cannot use CUDA (driver, toolkit or torch build mismatch: see "
                "`python -c 'import torch; torch.cuda.init()'`); set CUDA_VISIBLE_DEVICES= to train on the CPU"
            )
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(
            f"LOCAL_RANK={local_rank} but this node has {count} visible GPU(s): start at most {count} processes "
            "per node (torchrun --nproc_per_node) or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init_distributed() -> Dist:
    """Join the torchrun world (NCCL on CUDA, gloo on CPU), or make a world of one."""
    device = training_device(int(os.environ.get("LOCAL_RANK", 0)))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), device)


def close_distributed() -> None:
    # Free what the finished run left in reference cycles (FSDP state, DTensors, pending work
    # handles) on this thread while the group is alive: were the last reference to a gloo group
    # dropped later, on one of its own worker threads or at interpreter exit, the process would
    # abort after a successful run.
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


# Errors a user can act on (bad data, flags, paths, a checkpoint that does not fit): one line each.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)
TRACEBACK_ENV = "EEYORE_TRACEBACK"  # set to 1 to see the traceback of a user error too
OTHER_RANKS_REPORT_AFTER_S = 5.0


@contextlib.contextmanager
def launch(start: Callable[[], Dist] = init_distributed) -> Iterator[Dist]:
    """The process group of one training run, as `with launch(start) as d: ...` in a recipe's
    `main()`; `start()` joins it (the trainer's `start_run` also seeds and sets determinism).

    A user error (`USER_ERRORS`) ends the process with one line on stderr and exit status 1
    instead of a traceback. Every rank usually meets the same error (each reads the same data and
    flags), so rank 0 alone reports it; another rank reports only if it is still alive a few
    seconds later, i.e. when rank 0 did not fail too (torchrun stops the other ranks as soon as
    one exits with an error).
    """
    try:
        d = start()
    except (*USER_ERRORS, DeviceError) as exc:  # before the group exists: each rank says its own
        _exit_with_one_line(exc, int(os.environ.get("RANK", "0")))
    try:
        yield d
    except USER_ERRORS as exc:
        if not d.is_main:
            time.sleep(OTHER_RANKS_REPORT_AFTER_S)
        _exit_with_one_line(exc, d.rank)
    finally:
        close_distributed()


def _exit_with_one_line(exc: BaseException, rank: int) -> None:
    if os.environ.get(TRACEBACK_ENV) == "1":
        raise exc
    prefix = "" if rank == 0 else f"rank {rank}: "
    print(f"{prefix}error: {exc}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None


def data_parallel_mesh(d: Dist, zero_stage: int) -> DeviceMesh:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if zero_stage >= 2:
        return init_device_mesh(d.device.type, (d.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(d.device.type, (d.world_size, 1), mesh_dim_names=("replicate", "shard"))


def enable_activation_checkpointing(block: torch.nn.Module) -> None:
    """Recompute the block's activations in backward instead of keeping them.

    The forward is replaced on the instance (not wrapped in another module) so parameter names,
    and hence checkpoints, stay exactly HF's.
    """
    block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard_model(
    model: Llama, mesh: DeviceMesh, zero_stage: int, bf16: bool, gradient_checkpointing: bool, cpu_offload: bool = False,
) -> Llama:
    # bf16 compute copies of fp32 master weights; gradients are reduced (and kept) in fp32.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    # --adam_offload: sharded weights, gradients and so the optimizer state and update stay on the
    # CPU; pinned memory only speeds up copies to a GPU (and needs one).
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in model.model.layers:
        if gradient_checkpointing:
            enable_activation_checkpointing(block)
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=zero_stage == 3, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False, offload_policy=offload)
    register_fsdp_forward_method(model, "hidden_states")  # the loss calls it, not forward
    return model


def load_sharded(
    name_or_path: str | None, d: Dist, zero_stage: int = 2, bf16: bool = False, gradient_checkpointing: bool = False,
    store_dtype: torch.dtype = torch.float32, lora: LoRASpec | None = None, cpu_offload: bool = False,
) -> Llama:
    """The checkpoint at `name_or_path` (None: the default model) as an FSDP2 model.

    The one checkpoint loader (`eeyore.model.pretrained`) with a placing step: rank 0 alone reads
    the weights, and they are broadcast into the shards. Shards are kept in `store_dtype`: fp32
    master weights for a model that trains; a frozen model that computes in bf16 anyway (the DPO
    reference under `--bf16`) can keep bf16 shards, which gives the same outputs at half the memory.
    With `lora` the base is frozen and adapters (initialised on rank 0, like the weights) are added
    before sharding; `cpu_offload` keeps the shards on the CPU (`--adam_offload`).
    """
    if d.is_main:  # may convert the default model on first use: once, before the others look
        resolve_model_dir(name_or_path)
    d.barrier()

    def distribute(model: Llama, full: dict[str, torch.Tensor]) -> None:
        if lora is not None:
            add_adapters(model, lora)
        shard_model(model, data_parallel_mesh(d, zero_stage), zero_stage, bf16, gradient_checkpointing, cpu_offload)
        model.to_empty(device="cpu" if cpu_offload else d.device)
        if d.is_main and lora is not None:
            full.update({k: v.to(store_dtype) for k, v in initial_adapters(model, lora).items()})
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    return load_pretrained(Llama, name_or_path, store_dtype, "cpu", distribute=distribute, read=d.is_main)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors on rank 0's CPU (empty on the other ranks); a collective: call on every rank."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def reshard(model: torch.nn.Module) -> None:
    """Free gathered parameters left over by a forward without backward (evaluation)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
