"""Pieces the RL trainers (GRPO and distillation) share: their typed ``train:`` / ``run:`` option groups,
the trained state and its checkpoints, and the EMA of the trained weights. The loop itself is
`qirl.rl.loop`."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from qirl.checkpoint import load_checkpoint, save_checkpoint, sharded_tmp_dir
from qirl.config import dump_recipe
from qirl.distributed import (
    DistributedConfig,
    World,
    choose_strategy,
    full_state,
    full_tensor,
    init_world,
    shard_like,
    wrap_policy,
)
from qirl.errors import UserError
from qirl.models.policy import FlowPolicy
from qirl.models.registry import PolicyOptions
from qirl.rl.heldout import HeldoutConfig
from qirl.rl.lora import TINY_DIT_TARGETS, add_lora, save_policy
from qirl.runlog import checkpoint_to_resume
from qirl.schedules import ema_decay_at, lr_at


@dataclass
class TrainOptions:
    """The ``train:`` options every RL trainer shares (GRPO and distillation extend it): the schedule, the
    optimiser (AdamW), what is trained (full weights or LoRA adapters) and the EMA of the trained weights."""

    iterations: int = 100
    prompts_per_iter: int = 8  # prompts (GRPO: groups; distillation: trajectories) per iteration
    micro_batch: int = 16  # rows per rollout / train micro-batch
    lr: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear lr warm-up (iterations), then constant (`qirl.schedules.lr_at`)
    grad_clip: float = 1.0
    lora_rank: int = 0  # > 0: train LoRA adapters (peft) of this rank instead of every DiT weight
    lora_alpha: float = 16.0
    lora_targets: str = "auto"  # regex over module names; auto: the policy's default_lora_targets
    ema_decay: float = 0.0  # > 0: keep an EMA of the trained weights (with warm-up); eval and export use it

    def lr_at(self, iteration: int) -> float:
        return lr_at(iteration, self.lr, self.warmup_steps)


@torch.no_grad()
def ema_update(ema: dict[str, Tensor], params: dict[str, Tensor], iteration: int, decay: float) -> None:
    """``ema <- d ema + (1 - d) theta`` with the warmed-up decay ``d = min(decay, (1 + n) / (10 + n))``
    (`qirl.schedules.ema_decay_at`, as diffusers' EMAModel)."""
    d = ema_decay_at(iteration, decay)
    for name, p in params.items():
        ema[name].lerp_(p.detach(), 1.0 - d)


@contextmanager
def ema_weights(params: dict[str, Tensor], ema: dict[str, Tensor] | None) -> Iterator[None]:
    """Run the block with the EMA weights in place of the trained ones (no-op without EMA)."""
    if ema is None:
        yield
        return
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(ema[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


CHECKPOINT_FORMATS = ("full", "sharded")


@dataclass
class TrainRun:
    """The ``run:`` section of GRPO and distillation recipes."""

    out_dir: str = "runs/grpo"
    seed: int = 0
    log_every: int = 1
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    tensorboard: bool = True  # also write <out_dir>/tb when tensorboard is installed
    wandb: bool = False  # also log to Weights & Biases (<out_dir>/wandb; pip install 'qirl[wandb]')
    wandb_project: str = "qirl"
    checkpoint_format: str = "full"  # full: one safetensors set (rank 0 gathers) | sharded: per-rank DCP shards


class TrainerRecipe(Protocol):
    """What the RL loop reads of a GRPO or distillation recipe."""

    policy: PolicyOptions
    train: TrainOptions
    eval: HeldoutConfig
    run: TrainRun
    distributed: DistributedConfig


def validate_common(recipe: TrainerRecipe, world_size: int = 1) -> None:
    """The checks both trainers' recipes share (``distributed``, ``run``, ``eval``, and the split of
    ``train.prompts_per_iter`` over ``world_size`` processes); a UserError naming the key."""
    recipe.distributed.validate()
    p, run = recipe.train.prompts_per_iter, recipe.run
    if p % world_size:
        raise UserError(f"train.prompts_per_iter={p} must be divisible by the number of processes ({world_size})")
    if run.checkpoint_format not in CHECKPOINT_FORMATS:
        raise UserError(f"run.checkpoint_format must be full or sharded, got {run.checkpoint_format!r}")
    if run.checkpoint_every < 1 or run.log_every < 1:
        raise UserError("run.checkpoint_every and run.log_every must be >= 1")
    if recipe.eval.every < 0 or recipe.eval.n < 0 or recipe.eval.grid < 0:
        raise UserError("eval.every, eval.n and eval.grid must be >= 0")


def start_run(recipe: TrainerRecipe, resume: bool) -> tuple[World, slice, Path, Path | None]:
    """Join the torchrun process group (if any) and find the checkpoint to resume: (world, this rank's
    share of ``train.prompts_per_iter``, out_dir, checkpoint or None). Every rank has looked at out_dir
    before this returns, so rank 0 may write into it."""
    world = init_world(recipe.distributed)
    mine = world.rows(recipe.train.prompts_per_iter, "train.prompts_per_iter")
    out = Path(recipe.run.out_dir)
    existing = checkpoint_to_resume(out, resume)
    world.barrier()
    return world, mine, out, existing


def micro_batches(n: int, size: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering rows 0..n in pieces of at most ``size``."""
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def lora_targets(policy: FlowPolicy, train: TrainOptions) -> str:
    """``train.lora_targets``, where ``auto`` is the policy's own `default_lora_targets` (its attention
    and MLP projections)."""
    if train.lora_targets == "auto":
        return getattr(policy, "default_lora_targets", TINY_DIT_TARGETS)
    return train.lora_targets


def _optimizer_state_by_name(opt: torch.optim.Optimizer, names: list[str]) -> dict[str, Any]:
    """``opt.state_dict()`` keyed by parameter name instead of position, with full (gathered) tensors,
    so a checkpoint loads whatever the number of processes or the parameter order."""
    sd = opt.state_dict()
    state = {names[i]: full_state(v) for i, v in sd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def _optimizer_state_by_index(saved: dict[str, Any], names: list[str], named: dict[str, Tensor]) -> dict[str, Any]:
    """The inverse of `_optimizer_state_by_name` for this process's parameters (moments sharded like
    their parameter). A checkpoint written before the name keys (integer keys) passes through."""
    if all(isinstance(i, int) for g in saved["param_groups"] for i in g["params"]):
        return saved
    index = {n: i for i, n in enumerate(names)}
    state = {}
    for name, value in saved["state"].items():
        p = named[name]
        state[index[name]] = {
            k: shard_like(v, p) if (isinstance(v, Tensor) and v.shape == p.shape) else v for k, v in value.items()
        }
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}


@dataclass
class TrainState:
    """What both RL trainers train and checkpoint: the trained weights (full DiT or LoRA adapters, by
    name), their optional EMA, AdamW, the numpy data RNG, the torch generator and the iteration.

    ``view`` is what the trainer calls for velocities (the policy, or its DDP view under torchrun;
    `qirl.distributed`). Under several processes every rank holds the same RNG states; checkpoints hold
    full tensors written by rank 0, so a run resumes on any number of processes.
    """

    params: list[torch.nn.Parameter]
    named: dict[str, Tensor]
    ema: dict[str, Tensor] | None
    opt: torch.optim.Optimizer
    rng: np.random.Generator
    gen: torch.Generator
    iteration: int = 0
    view: Any = None
    world: World = field(default_factory=World)
    strategy: str = "none"  # none (one process) | ddp | fsdp
    grad_norm: float = 0.0  # of the last `step`, before clipping
    skipped: int = 0  # steps skipped for a non-finite loss or gradient in this process

    @classmethod
    def create(
        cls,
        policy: FlowPolicy,
        train: TrainOptions,
        seed: int,
        world: World | None = None,
        distributed: DistributedConfig | None = None,
        tasks: set[str] | None = None,
        resume_from: Path | None = None,
    ) -> TrainState:
        """Freeze all but the trained weights (``train.lora_rank`` > 0: LoRA adapters through peft; else
        the policy's `trainable_parameters`), wrap for data parallelism (DDP or FSDP2, several processes
        only), then AdamW, the EMA copy and seeded RNGs; `check_tasks` on the ``tasks`` the data draws,
        and `restore` ``resume_from`` when given."""
        world = world or World()
        lora = train.lora_rank > 0
        if lora:
            add_lora(policy, train.lora_rank, train.lora_alpha, lora_targets(policy, train))
        else:
            trainable = {id(p) for p in policy.trainable_parameters()}
            for p in policy.parameters():
                p.requires_grad_(id(p) in trainable)
        view, strategy = policy, "none"
        if world.distributed:
            config = distributed or DistributedConfig()
            strategy = choose_strategy(config, policy, lora)
            view = wrap_policy(policy, world, strategy, config.mixed_precision)
        # Collected after wrapping: FSDP2 swaps parameters for sharded DTensors.
        named = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        params = list(named.values())
        ema = {n: p.detach().clone() for n, p in named.items()} if train.ema_decay > 0 else None
        opt = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)
        rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
        state = cls(params, named, ema, opt, rng, gen, view=view, world=world, strategy=strategy)
        state.check_tasks(tasks or set())
        if resume_from is not None:
            state.restore(resume_from, policy)
        return state

    def check_tasks(self, tasks: set[str]) -> None:
        """FSDP2's forward and backward are collectives, so every rank must run the same number of them. A
        micro-batch mixing text-to-image and edit rows runs one forward per task (distillation's routes;
        an edit pipeline's token counts), and ranks draw different mixes: refuse it up front."""
        if self.strategy == "fsdp" and len(tasks) > 1:
            raise UserError(
                f"distributed.strategy=fsdp needs one task per run (the prompts mix {', '.join(sorted(tasks))}): "
                "ranks would run different numbers of sharded forwards; use distributed.strategy=ddp (or LoRA)"
            )

    def restore(self, path: Path, policy: FlowPolicy) -> None:
        """Load a checkpoint written by `save`; a mismatched one (other model or LoRA setting) is a UserError."""
        ckpt = load_checkpoint(path)
        if ckpt.state.get("format") == "sharded":
            self._restore_sharded(ckpt)
            return
        missing = set(self.named) - set(ckpt.tensors["model"])
        if missing:
            raise UserError(
                f"{path}: checkpoint lacks weights {sorted(missing)[:3]}; was it made from another model or LoRA setting?"
            )
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(shard_like(ckpt.tensors["model"][n], p))
        names = list(self.named)
        self.opt.load_state_dict(_optimizer_state_by_index(ckpt.nested("optimizer"), names, self.named))
        if self.ema is not None and "ema" in ckpt.tensors:
            self.ema = {n: shard_like(ckpt.tensors["ema"][n].clone(), p) for n, p in self.named.items()}
        self.rng.bit_generator.state = ckpt.state["data_rng"]
        self.gen.set_state(ckpt.tensors["rng"]["torch"])
        self.iteration = ckpt.step

    def step(self, finite: bool, iteration: int, train: TrainOptions) -> tuple[float, bool]:
        """Clip the accumulated gradients to ``train.grad_clip`` and take one AdamW step (then the EMA),
        unless the loss or the gradient norm is not finite on any rank: then the step is skipped and
        weights and optimizer state stay untouched. Returns (gradient norm before clipping, skipped), also
        kept as ``grad_norm`` and counted in ``skipped``."""
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(self.params, train.grad_clip)))
        skipped = not self.world.all_true(finite and math.isfinite(grad_norm))
        self.grad_norm = grad_norm
        self.skipped += skipped
        if skipped:
            self.opt.zero_grad(set_to_none=True)
        else:
            self.opt.step()
            if self.ema is not None:
                ema_update(self.ema, self.named, iteration, train.ema_decay)
        return grad_norm, skipped

    def _sharded_state(self) -> dict[str, Any]:
        """Model, optimizer moments and EMA by name, as this rank holds them (DTensor shards under FSDP2);
        what `torch.distributed.checkpoint` saves and loads in place. AdamW's state is created (zeros)
        when this process has not stepped yet, so a fresh process can load into it."""
        for p in self.params:
            if p not in self.opt.state:
                self.opt.state[p] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        state: dict[str, Any] = {
            "model": dict(self.named),
            "optimizer": {n: self.opt.state[p] for n, p in self.named.items()},
        }
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    def _restore_sharded(self, ckpt: Any) -> None:
        import torch.distributed.checkpoint as dcp

        state = self._sharded_state()
        try:
            dcp.load(state, checkpoint_id=str(ckpt.path / "dcp"), no_dist=not self.world.distributed)
        except (RuntimeError, ValueError, KeyError) as err:
            raise UserError(
                f"{ckpt.path}: cannot load the sharded checkpoint ({str(err).splitlines()[0]}); "
                "was it made from another model or LoRA setting?"
            ) from None
        self.rng.bit_generator.state = ckpt.state["data_rng"]
        self.gen.set_state(ckpt.tensors["rng"]["torch"])
        self.iteration = ckpt.step

    def save(self, out: Path, iteration: int, recipe: TrainerRecipe) -> Path:
        """Atomic checkpoint of everything `restore` needs (`qirl.checkpoint.save_checkpoint`).

        Full (default): every rank gathers each tensor (a collective), rank 0 writes one safetensors file
        per group. Sharded: every rank writes its own shards with `torch.distributed.checkpoint` (no
        gather: for models whose full state does not fit one host), rank 0 adds the RNG states and
        publishes the folder. Both resume on any number of processes; `qirl.checkpoint.consolidate`
        turns a sharded one into one safetensors file. Sharded needs a file system all ranks share.
        ``recipe.run`` gives the format and how many checkpoints to keep.
        """
        keep = recipe.run.keep_checkpoints
        if recipe.run.checkpoint_format == "sharded":
            import torch.distributed.checkpoint as dcp

            tmp = sharded_tmp_dir(out, iteration)
            if self.world.is_main:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
                tmp.mkdir(parents=True)
            self.world.barrier()
            dcp.save(self._sharded_state(), checkpoint_id=str(tmp / "dcp"), no_dist=not self.world.distributed)
            self.world.barrier()
            path = Path(out) / "checkpoints" / f"step_{iteration:08d}"
            if self.world.is_main:
                state = {"data_rng": self.rng.bit_generator.state, "recipe": dump_recipe(recipe), "format": "sharded"}
                path = save_checkpoint(out, iteration, {"rng": {"torch": self.gen.get_state()}}, state, keep=keep, into=tmp)
            self.world.barrier()
            return path
        names = list(self.named)
        tensors: dict[str, dict[str, Tensor]] = {
            "model": {n: full_tensor(p).detach().clone() for n, p in self.named.items()},
            "rng": {"torch": self.gen.get_state()},
        }
        if self.ema is not None:
            tensors["ema"] = full_state(self.ema)
        optimizer = _optimizer_state_by_name(self.opt, names)
        path = Path(out) / "checkpoints" / f"step_{iteration:08d}"
        if self.world.is_main:
            path = save_checkpoint(
                out,
                iteration,
                tensors,
                {"data_rng": self.rng.bit_generator.state, "recipe": dump_recipe(recipe)},
                nested={"optimizer": optimizer},
                keep=keep,
            )
        self.world.barrier()
        return path


def export_policy(
    policy: FlowPolicy, directory: Path, lora: bool, world: World, rebuild: Callable[[], FlowPolicy], train: TrainOptions
) -> None:
    """Save the trained policy (LoRA merged) as a model folder; rank 0 writes.

    Under FSDP2 the weights are sharded: every rank gathers the full state dict (a collective), and rank 0
    loads it into a fresh unsharded copy from ``rebuild()`` (with the same LoRA adapters) to save that.
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in policy.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if world.is_main:
            fresh = rebuild()
            if lora:
                add_lora(fresh, train.lora_rank, train.lora_alpha, lora_targets(fresh, train))
            fresh.load_state_dict(full)
            save_policy(fresh, directory, lora=lora)
    elif world.is_main:
        save_policy(policy, directory, lora=lora)
    world.barrier()


def step_noises(
    gen: torch.Generator, global_chunks: list[tuple[int, int]], window: list[int], shape: Any, lo: int, hi: int
) -> dict[int, Tensor]:
    """The SDE noises {n: [hi - lo, C, H, W]} of global rows lo..hi, drawn for the WHOLE global batch in
    the order a one-process run draws them (micro-batch by micro-batch, window step by window step), so
    a run's rollouts do not depend on its number of processes."""
    drawn: dict[int, list[Tensor]] = {n: [] for n in window}
    for a, b in global_chunks:
        for n in window:
            drawn[n].append(torch.randn((b - a, *shape), generator=gen, dtype=torch.float32))
    return {n: torch.cat(parts)[lo:hi] for n, parts in drawn.items()}
