"""Data-parallel sums across processes (docs/method.md §4): each process owns a shard, results are summed."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import ConfigurationError


class Processes:
    """Rank, world size and an explicit sum over processes; a no-op in a single process."""

    def __init__(self):
        if dist.is_available() and dist.is_initialized():
            self.index, self.count = dist.get_rank(), dist.get_world_size()
        else:
            self.index, self.count = 0, 1

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def shard(self, indices: list[int]) -> list[int]:
        """This process's share of `indices` (strided, so shards differ in size by at most one)."""
        return indices[self.index :: self.count]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.count > 1:
            if tensor.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
                reduced = tensor.cuda()
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
                tensor.copy_(reduced.cpu())
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _model_sharding(model: torch.nn.Module | None) -> str | None:
    """The sharding setup the model shows: FSDP wrappers or ZeRO-3 partitioned parameters."""
    if model is None:
        return None
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
            return "FSDP"
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        return "DeepSpeed ZeRO-3"
    return None


def _accelerator_sharding(accelerator) -> str | None:
    """The sharding setup of the accelerator's state (or of accelerate's shared state, if one was made)."""
    state = getattr(accelerator, "state", None)
    if state is None:
        from accelerate.state import AcceleratorState

        state = AcceleratorState() if AcceleratorState._shared_state else None
    if state is None:
        return None
    kind = str(getattr(state, "distributed_type", ""))
    if "FSDP" in kind:
        return "FSDP"
    plugin = getattr(state, "deepspeed_plugin", None)
    if "DEEPSPEED" in kind and plugin is not None and getattr(plugin, "zero_stage", None) == 3:
        return "DeepSpeed ZeRO-3"
    return None


def _environment_sharding() -> str | None:
    """The sharding setup the environment of `accelerate launch` names."""
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if _env_flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        return "DeepSpeed ZeRO-3"
    return None


def sharded_training_setup(model: torch.nn.Module | None = None, accelerator=None) -> str | None:
    """The name of a parameter-sharding setup (FSDP, DeepSpeed ZeRO-3) in effect, else None.

    Looks at the model (FSDP wrappers, ZeRO-3 partitioned parameters), the accelerator's state and the
    environment `accelerate launch` sets (`ACCELERATE_USE_FSDP`, `ACCELERATE_USE_DEEPSPEED` with
    `ACCELERATE_DEEPSPEED_ZERO_STAGE=3`), so that a CLI run under such a launch is caught too.
    """
    return _model_sharding(model) or _accelerator_sharding(accelerator) or _environment_sharding()


def check_curvature_supported(curvature: str, model: torch.nn.Module | None = None, accelerator=None) -> None:
    """Fail early where the curvature operator cannot run (docs/method.md §4): exact Hessian-vector products need
    a double backward through whole, unsharded parameters, which FSDP and DeepSpeed ZeRO-3 do not give."""
    if curvature != "hessian":
        return
    setup = sharded_training_setup(model, accelerator)
    if setup is not None:
        raise ConfigurationError(
            f"curvature='hessian' (exact double-backward Hessian-vector products) does not work under "
            f"{setup}, which shards the parameters. Run the unlearning data-parallel (DDP: `torchrun` or "
            "`accelerate launch --multi_gpu`) on the trained adapter, or use a first-order curvature "
            "('ggn' or 'fisher') where available."
        )


def join_process_group() -> Processes:
    """Join the process group a launcher (`torchrun`, `accelerate launch`) set up, if any.

    Accelerate's `PartialState` initialises it on GPUs; on CPU it may report a single process although
    `WORLD_SIZE` says otherwise, so the group is joined here with gloo when it is still missing. Rank and
    world size are then taken from `torch.distributed`, never from the accelerate state.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and dist.is_available() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState()
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Processes()


def barrier(processes: Processes) -> None:
    if processes.count > 1:
        dist.barrier()
