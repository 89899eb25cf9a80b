"""Data-parallel training over torch.distributed: torchrun for processes, DDP or FSDP2 for the weights.

A run started by ``torchrun --nproc_per_node N -m qirl.cli grpo recipe.yaml`` (or ``qirl grpo recipe.yaml
--nproc N``, which calls torchrun's launcher) has N processes; the environment torchrun sets (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is all `init_world` reads. Without it the run is one process
and every helper here is the identity.

How the work splits (`qirl.rl.grpo`): every rank draws the SAME global prompts and noises from the same
seeded generators and keeps its own slice of prompts (whole GRPO groups, so group statistics need no
communication); rollouts and rewards are local; the loss is each rank's mean over its rows, and the
gradient all-reduce averages it, which is the global mean because every rank has the same number of
rows. The result equals a one-process run with the same global batch up to floating-point summation
order (tested with gloo and 2 processes in ``tests/test_distributed.py``).

Weight strategies (`wrap_policy`):
- ``ddp``: `torch.nn.parallel.DistributedDataParallel` over the whole policy (replicated weights, one
  all-reduce of the gradients per optimizer step: the forwards before the last backward of a step run
  under ``no_sync``). For models that fit on one device, and for LoRA.
- ``fsdp``: FSDP2, `torch.distributed.fsdp.fully_shard`, on every transformer block and then on the
  denoiser root (parameters, gradients and AdamW state sharded across ranks; blocks gathered one at a
  time in forward and backward). For full-parameter training of models that do not fit. Optional
  mixed precision (bf16 compute, fp32 gradient reduction).
- ``auto``: fsdp for full-parameter training of a denoiser above 1e8 parameters, else ddp.

Checkpoints stay one set of full tensors (`full_tensor` gathers each sharded parameter or optimizer
state; rank 0 writes), so a run resumes on any number of processes and the files are the same as a
one-process run's; `shard_like` cuts a full tensor back to this rank's shard on load.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qirl.errors import UserError

STRATEGIES = ("auto", "ddp", "fsdp")
MIXED_PRECISION = ("none", "bfloat16")
FSDP_AUTO_MIN_PARAMS = 100_000_000


@dataclass
class DistributedConfig:
    """The recipe's ``distributed:`` section (used only when started with several processes)."""

    strategy: str = "auto"  # auto | ddp | fsdp (see the module docstring)
    mixed_precision: str = "none"  # fsdp only: none | bfloat16 (compute in bf16, reduce gradients in fp32)
    backend: str = "auto"  # auto: nccl with CUDA, gloo on the CPU

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(
                f"distributed.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}"
            )


@dataclass
class World:
    """This process's place in the run: rank, world size, local rank (its GPU on the node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather_rows(self, x: Tensor) -> Tensor:
        """Concatenate every rank's ``x`` [n, ...] along dim 0, in rank order (equal n on every rank)."""
        if not self.distributed:
            return x
        device = _collective_device()
        parts = [torch.empty_like(x, device=device) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous().to(device))
        return torch.cat(parts).to(x.device)

    def mean(self, value: float) -> float:
        """The mean over ranks of a Python number."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` holds on every rank (one rank skipping a step makes every rank skip it)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def rows(self, n: int, what: str) -> slice:
        """This rank's contiguous share of ``n`` items; ``n`` must divide evenly (equal rows per rank keep
        the averaged gradient equal to the global mean)."""
        if n % self.size:
            raise UserError(f"{what}={n} must be divisible by the number of processes ({self.size})")
        k = n // self.size
        return slice(self.rank * k, (self.rank + 1) * k)


def _collective_device() -> torch.device:
    """Where collective tensors live: the current GPU under nccl, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_world(config: DistributedConfig | None = None) -> World:
    """Join the process group torchrun describes in the environment (a no-op for a single process).

    Backend ``auto`` is nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    config = config or DistributedConfig()
    config.validate()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = config.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
    return world


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------- wrapping


class DataParallelPolicy:
    """The trainer's view of a DDP-wrapped policy: ``velocity`` goes through the DDP module (so the
    gradient all-reduce hooks are armed), everything else is the policy's own attribute."""

    def __init__(self, policy: nn.Module, ddp: nn.Module) -> None:
        self._policy = policy
        self._ddp = ddp

    def velocity(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor:
        return self._ddp(x_t, t, cond)

    def no_sync(self) -> contextlib.AbstractContextManager[None]:
        return self._ddp.no_sync()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


def denoiser(policy: nn.Module) -> nn.Module:
    """The module whose forward computes the velocity and holds the trained weights: a diffusers
    adapter's ``transformer``, else the policy itself (the tiny DiT, whose `velocity` calls itself)."""
    inner = getattr(policy, "transformer", None)
    return inner if isinstance(inner, nn.Module) else policy


def choose_strategy(config: DistributedConfig, policy: nn.Module, lora: bool) -> str:
    if config.strategy != "auto":
        return config.strategy
    n = sum(p.numel() for p in denoiser(policy).parameters())
    return "fsdp" if (not lora and n >= FSDP_AUTO_MIN_PARAMS) else "ddp"


def _blocks(module: nn.Module, skip: str = "text_encoder") -> list[nn.Module]:
    """The transformer blocks: every element of a ModuleList whose name ends in ``blocks``
    (``blocks`` in the tiny DiT, ``transformer_blocks`` / ``single_transformer_blocks`` in diffusers),
    outside the frozen text encoder."""
    out: list[nn.Module] = []
    for name, child in module.named_modules():
        if name.split(".")[0] == skip:
            continue
        if isinstance(child, nn.ModuleList) and name.split(".")[-1].endswith("blocks"):
            out.extend(child)
    return out


def wrap_policy(policy: nn.Module, world: World, strategy: str, mixed_precision: str = "none") -> Any:
    """Prepare the policy for data-parallel training; call after LoRA injection and freezing, before the
    optimizer is built (FSDP2 replaces parameters by sharded DTensors). Returns what the trainer should
    call (`DataParallelPolicy` for ddp, the policy itself for fsdp, whose hooks live on the modules)."""
    if not world.distributed:
        return policy
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # init_sync=False: every rank loaded the same weights and seeded its LoRA init identically;
        # forward_sync_buffers=False: buffers are constants (positions); no collective in a forward.
        # A policy with task-specific weights (the tiny DiT's source projection, used only by edit rows)
        # asks DDP not to wait for gradients a micro-batch without that task never produces.
        unused = bool(getattr(policy, "has_task_specific_parameters", False))
        ddp = DistributedDataParallel(
            policy, init_sync=False, forward_sync_buffers=False, find_unused_parameters=unused
        )
        return DataParallelPolicy(policy, ddp)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy()
        if mixed_precision == "bfloat16":
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        root = denoiser(policy)
        for block in _blocks(root):
            fully_shard(block, mp_policy=mp)
        # A frozen text encoder inside the root (the tiny DiT's) runs outside its forward: not sharded.
        encoder = getattr(root, "text_encoder", None)
        ignored = set(encoder.parameters()) if isinstance(encoder, nn.Module) else None
        fully_shard(root, mp_policy=mp, ignored_params=ignored)
        return policy
    raise UserError(f"distributed.strategy must be ddp or fsdp here, got {strategy!r}")


def sync_gradients(view: Any, last: bool) -> contextlib.AbstractContextManager[None]:
    """Context for one forward + backward of a step with several: DDP all-reduces only on the last."""
    if isinstance(view, DataParallelPolicy) and not last:
        return view.no_sync()
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------- full <-> sharded


def full_tensor(x: Tensor) -> Tensor:
    """The whole tensor of a (possibly FSDP-sharded) DTensor; a collective: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` cut to the layout of ``like`` (a DTensor: this rank's shard on its mesh), on like's device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements)
    return full.to(like.device)


def full_state(tree: Any) -> Any:
    """`full_tensor` on every tensor of a nested dict/list (an optimizer state, an EMA dict)."""
    if isinstance(tree, Tensor):
        return full_tensor(tree).detach()
    if isinstance(tree, dict):
        return {k: full_state(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(full_state(v) for v in tree)
    return tree
