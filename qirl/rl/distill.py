"""On-policy distillation of task-specialised RL teachers into one student (`qirl distill`).

Source: the Qwen-Image-2.0-RL report, on-policy distillation (OPD) stage (summary in `seed/`, see
DESIGN.md). RL makes one policy per task (a T2I and an edit teacher: `qirl grpo recipes/<task>.yaml`);
OPD merges them into a single student by trajectory-level velocity matching on the student's own
samples, with no reward model and without the cross-task conflicts of one policy trained on mixed
rewards (Mix-RL):

    L_OPD = E_{c, x_{1:N} ~ pi_theta(. | c)} [ sum_n || v_theta(x_{t_n}, t_n, c) - v_T(c)(x_{t_n}, t_n, c) ||^2 ]

where T(c) is the teacher of prompt c's task. One iteration:

1. Draw B prompt records (`qirl.rl.prompts.PromptSource`: `shapes-mix` with ``data.edit_fraction``, or a
   JSONL); every task the source can draw must have a teacher (checked before anything loads). Encode
   each micro-batch's prompts once per task with the student and with that task's teacher (no grad;
   the text encoders are frozen); the rollout reuses the student's conditions (`rows_condition`).
2. Roll the student out without grad from seeded noise (``rollout``): the Flow-GRPO SDE (`sample_sde`,
   ``keep_all_states=True``; the stochastic policy pi_theta of the RL stage) or the Euler ODE
   (`sample_ode`, the deployment sampler), with or without CFG (``rollout.guidance``). All N + 1 states
   x_n are kept (grid t_n = `timesteps(N, shift)`; state 0 is the noise at t_0 = 1).
3. Per trajectory, the trained steps S: all N, or ``train.steps_per_traj`` = k of them drawn uniformly
   without replacement from the seeded generator (independently for each trajectory).
4. At each trained (x_n, t_n): the student's single-pass conditional velocity v_theta (with grad) and the
   teacher's velocity (no grad). Rows are grouped by task, so each teacher (and the student) runs one
   batched forward per task and step, each model on the condition it encoded itself; a student equal
   to its teacher thus computes the very same numbers (loss exactly 0). ``teacher.target``:
   - `conditional`: ``v_T = v_T(x_n, t_n, c)``; the student is then sampled with CFG like the teachers.
   - `guided`: ``v_T = v_u + s (v_c - v_u)`` with ``s = teacher.guidance``; the student, still matched
     in one CFG-free pass, learns the guided field (guidance distillation, Meng et al. 2023,
     arXiv:2210.03142) and is sampled without CFG (set ``eval.guidance: 1``).
5. Loss, through the fused kernel `qirl.ops.velocity_mse` (forward and backward):

       mse_b(n) = (1 / D) || v_theta - v_T ||^2             (D latent elements per sample)
       L        = (1 / B) sum_b (1 / |S_b|) sum_{n in S_b} mse_b(n)

   i.e. ``L_OPD / (N D)`` with steps and elements MEANED, not summed: a constant factor (so the
   minimiser and the gradient direction are the report's), and a subset of k steps is then an unbiased
   estimate of the same quantity, while lr and ``grad_clip`` do not have to change with N, k or the
   resolution. Gradients are accumulated over micro-batches, clipped, and applied in one AdamW step; a
   non-finite loss or gradient norm skips the step (weights and optimizer untouched) and is counted.
6. Metrics per iteration: ``loss``, ``loss/<task>`` (the same mean over that task's rows), ``grad_norm``,
   ``lr``, ``skipped``, ``nfe`` (below), timings. Every ``eval.every`` iterations, held-out oracle
   scores and grids on both tasks (`qirl.rl.heldout`). Atomic checkpoints; ``resume=True`` continues
   bit-exactly on CPU. The final student goes to ``<out_dir>/model`` (EMA weights if kept, LoRA merged).

Compute accounting (``nfe``, cumulative): network evaluations per sample, so arms (GRPO, Mix-RL, OPD) can
be compared at equal compute. A forward of a batch of b rows counts b; a CFG forward (cond + uncond)
counts 2b; a training forward + backward counts 3b (the backward costs about two forwards). Per
iteration: ``B (N r + k (3 + g))`` with ``r = 2`` if the rollout uses CFG else 1, ``g = 2`` for a guided
teacher target else 1, k the trained steps per trajectory. Text encoding, decoding and held-out
evaluation are not counted.

The run is a generator of metric dicts; it never prints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qirl import ops
from qirl.data import PromptRecord
from qirl.distributed import DistributedConfig, sync_gradients
from qirl.errors import UserError
from qirl.models.policy import Condition, FlowPolicy
from qirl.models.registry import PolicyOptions, load_policy
from qirl.prompt_sets import record_source
from qirl.rl.common import TrainOptions, TrainRun, micro_batches, step_noises, validate_common
from qirl.rl.heldout import HeldoutConfig
from qirl.rl.loop import Session
from qirl.rl.prompts import PromptSource
from qirl.sampling import guided_velocity, sample_ode, sample_sde, timesteps

logger = logging.getLogger(__name__)

TASKS = ("t2i", "edit")
TARGETS = ("conditional", "guided")
SAMPLERS = ("sde", "ode")


def _default_teachers() -> dict[str, str]:
    return {"t2i": "runs/grpo_t2i", "edit": "runs/grpo_edit"}


def _default_eval() -> HeldoutConfig:
    return HeldoutConfig(prompts="val-t2i,val-edit")


@dataclass
class DistillData:
    prompts: str = "shapes-mix"  # shapes-t2i | shapes-edit | shapes-mix (generated train splits) or a JSONL
    edit_fraction: float = 0.5  # share of edit prompts drawn by shapes-mix


@dataclass
class DistillTeacher:
    target: str = "conditional"  # conditional: v_c | guided: v_u + guidance (v_c - v_u) (student learns CFG)
    guidance: float = 3.0  # CFG scale of the guided target


@dataclass
class DistillRollout:
    sampler: str = "sde"  # sde (Flow-GRPO SDE, the RL policy) | ode (Euler, the deployment sampler)
    num_steps: int = 10  # N
    guidance: float = 3.0  # student rollout CFG scale (<= 1: no CFG)
    shift: float = 1.0
    noise_level: float = 0.7  # SDE noise level a (sde only)


@dataclass
class DistillTrain(TrainOptions):
    """`TrainOptions` (B = ``prompts_per_iter`` trajectories, one per prompt) and distillation's own."""

    prompts_per_iter: int = 16  # B
    lr: float = 1e-4
    steps_per_traj: int = 0  # 0: all N steps; k > 0: k steps per trajectory, drawn uniformly


@dataclass
class DistillRecipe:
    student: str = "base"  # policy spec for `load_policy` (the student's initialisation)
    policy: PolicyOptions = field(default_factory=PolicyOptions)  # how student and teachers load
    teachers: dict[str, str] = field(default_factory=_default_teachers)  # task -> model or run folder
    teacher: DistillTeacher = field(default_factory=DistillTeacher)
    data: DistillData = field(default_factory=DistillData)
    rollout: DistillRollout = field(default_factory=DistillRollout)
    train: DistillTrain = field(default_factory=DistillTrain)
    eval: HeldoutConfig = field(default_factory=_default_eval)
    run: TrainRun = field(default_factory=lambda: TrainRun(out_dir="runs/distill"))
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # torchrun runs only


# ------------------------------------------------------------------------------------------- recipe


def select_teachers(recipe: DistillRecipe, spec: str | None) -> DistillRecipe:
    """Apply ``--teachers``: a comma list of ``task`` (the recipe's teacher for it) or ``task=PATH``
    (an explicit model or run folder). Tasks not listed are dropped; None keeps the recipe's teachers."""
    if spec is None:
        return recipe
    chosen: dict[str, str] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        task, eq, path = (part.strip() for part in item.partition("="))
        if task not in TASKS:
            raise UserError(f"--teachers {spec!r}: unknown task {task!r} (tasks: {', '.join(TASKS)})")
        if task in chosen:
            raise UserError(f"--teachers {spec!r}: task {task!r} is given twice")
        if eq and not path:
            raise UserError(f"--teachers {spec!r}: empty path for task {task!r}")
        if not eq and task not in recipe.teachers:
            raise UserError(f"--teachers {spec!r}: the recipe has no teachers.{task}; give {task}=PATH")
        chosen[task] = path if eq else recipe.teachers[task]
    if not chosen:
        raise UserError(f"--teachers {spec!r}: no task given (e.g. --teachers t2i,edit)")
    return dataclasses.replace(recipe, teachers=chosen)


def validate(recipe: DistillRecipe, world_size: int = 1) -> None:
    """UserError naming the key for every setting a run cannot use (on ``world_size`` processes)."""
    r, t, tt = recipe.rollout, recipe.train, recipe.teacher
    if not recipe.teachers:
        raise UserError(
            "teachers: no teacher given (e.g. teachers: {t2i: runs/grpo_t2i, edit: runs/grpo_edit})"
        )
    for task, spec in recipe.teachers.items():
        if task not in TASKS:
            raise UserError(f"teachers.{task}: unknown task (tasks: {', '.join(TASKS)})")
        if not spec:
            raise UserError(f"teachers.{task}: empty model path")
    if tt.target not in TARGETS:
        raise UserError(f"teacher.target must be one of {', '.join(TARGETS)}, got {tt.target!r}")
    if tt.target == "guided" and tt.guidance <= 1.0:
        raise UserError(
            f"teacher.target=guided needs teacher.guidance > 1, got {tt.guidance} (use teacher.target=conditional)"
        )
    if r.sampler not in SAMPLERS:
        raise UserError(f"rollout.sampler must be one of {', '.join(SAMPLERS)}, got {r.sampler!r}")
    if r.num_steps < 1:
        raise UserError(f"rollout.num_steps must be >= 1, got {r.num_steps}")
    if r.shift <= 0:
        raise UserError(f"rollout.shift must be > 0, got {r.shift}")
    if r.noise_level < 0:
        raise UserError(f"rollout.noise_level must be >= 0, got {r.noise_level}")
    for key in ("iterations", "prompts_per_iter", "micro_batch"):
        if getattr(t, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if not 0 <= t.steps_per_traj <= r.num_steps:
        raise UserError(
            f"train.steps_per_traj must be in [0, rollout.num_steps={r.num_steps}] (0: all), got {t.steps_per_traj}"
        )
    if t.grad_clip <= 0:
        raise UserError(f"train.grad_clip must be > 0, got {t.grad_clip}")
    if t.lora_rank < 0:
        raise UserError(f"train.lora_rank must be >= 0, got {t.lora_rank}")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay must be in [0, 1), got {t.ema_decay}")
    validate_common(recipe, world_size)


def steps_per_traj(recipe: DistillRecipe) -> int:
    """k, the trained steps of each trajectory (all N when ``train.steps_per_traj`` is 0)."""
    return recipe.train.steps_per_traj or recipe.rollout.num_steps


def nfe_per_iteration(recipe: DistillRecipe) -> int:
    """Network evaluations per iteration, per sample: ``B (N r + k (3 + g))`` (module docstring)."""
    r = 2 if recipe.rollout.guidance > 1.0 else 1
    g = 2 if recipe.teacher.target == "guided" else 1
    n, k = recipe.rollout.num_steps, steps_per_traj(recipe)
    return recipe.train.prompts_per_iter * (n * r + k * (3 + g))



# ------------------------------------------------------------------------------------------ teachers


def _load_teacher(task: str, spec: str, options: PolicyOptions | None = None) -> FlowPolicy:
    """A frozen teacher (eval mode, no grad); a missing one is a UserError saying which run makes it."""
    if spec != "base" and not Path(spec).exists():
        raise UserError(
            f"teacher for task {task!r}: {spec} does not exist; make it with `qirl grpo {task} run.out_dir={spec}` "
            f"or point to another run or model (--teachers {task}=PATH)"
        )
    try:
        teacher = load_policy(spec, options=options)
    except UserError as err:
        raise UserError(f"teacher for task {task!r}: {err}") from None
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def load_teachers(recipe: DistillRecipe, tasks: set[str]) -> dict[str, FlowPolicy]:
    """{task: frozen teacher} for the tasks the data draws; a spec shared by two tasks is loaded once."""
    missing = sorted(tasks - set(recipe.teachers))
    if missing:
        need, have = ", ".join(missing), ", ".join(sorted(recipe.teachers)) or "none"
        every = ",".join(sorted(set(recipe.teachers) | tasks))
        raise UserError(
            f"data.prompts={recipe.data.prompts!r} draws {need} prompts but there is no teacher for {need} "
            f"(teachers: {have}); add one (--teachers {every}, or teachers.{missing[0]}=PATH) or change data.prompts"
        )
    unused = sorted(set(recipe.teachers) - tasks)
    if unused:
        logger.warning(
            "teachers %s not loaded: data.prompts=%r draws no such prompts", unused, recipe.data.prompts
        )
    absent = [(task, recipe.teachers[task]) for task in sorted(tasks)
              if recipe.teachers[task] != "base" and not Path(recipe.teachers[task]).exists()]
    if absent:  # every missing run in one line, with the command that makes it
        what = ", ".join(f"{task} ({spec})" for task, spec in absent)
        how = " and ".join(f"`qirl grpo {task} run.out_dir={spec}`" for task, spec in absent)
        flag = ",".join(f"{task}=PATH" for task, _ in absent)
        raise UserError(f"teacher runs not found: {what}; make them with {how}, or point to others (--teachers {flag})")
    loaded: dict[str, FlowPolicy] = {}
    out = {}
    for task in sorted(tasks):
        spec = recipe.teachers[task]
        if spec not in loaded:
            loaded[spec] = _load_teacher(task, spec, recipe.policy)
        out[task] = loaded[spec]
    return out


@dataclass
class Route:
    """The rows of one task inside a micro-batch, with the condition encoded by the student and by the
    task's teacher (each model encodes with its own frozen text encoder)."""

    task: str
    rows: Tensor  # [b_task] long, positions in the micro-batch
    cond: Condition  # [b_task], the student's
    teacher_cond: Condition  # [b_task]
    teacher_uncond: Condition | None  # [b_task], for a guided target


@torch.no_grad()
def routes(
    student: FlowPolicy,
    teachers: dict[str, FlowPolicy],
    records: Sequence[PromptRecord],
    sources: Sequence[Tensor | None],
    target: DistillTeacher,
) -> list[Route]:
    """Group a micro-batch's rows by task, so each teacher (and the student) runs one batched forward per
    task and step; a student identical to the teacher then computes the very same numbers (loss 0)."""
    out = []
    for task in TASKS:
        idx = [i for i, r in enumerate(records) if r.task == task]
        if not idx:
            continue
        prompts = [records[i].prompt for i in idx]
        srcs = [sources[i] for i in idx] if task == "edit" else None
        teacher = teachers[task]
        teacher_cond = teacher.encode(prompts, srcs).detach()
        uncond = teacher.null_condition(teacher_cond) if target.target == "guided" else None
        cond = student.encode(prompts, srcs).detach()
        out.append(Route(task, torch.tensor(idx, dtype=torch.long), cond, teacher_cond, uncond))
    return out


def rows_condition(
    student: FlowPolicy, routed: Sequence[Route], records: Sequence[PromptRecord], sources: Sequence[Tensor | None]
) -> Condition:
    """The student's condition of a whole micro-batch, in row order, from its routes' conditions, so the
    rollout does not encode the prompts a second time. A family whose T2I and edit conditions carry
    different extras (a diffusers edit pipeline's image ids) cannot be concatenated: its micro-batch is
    encoded once more, as one batch."""
    if len({frozenset(route.cond.extras) for route in routed}) > 1:
        with torch.no_grad():
            return student.encode([r.prompt for r in records], list(sources)).detach()
    order = torch.cat([route.rows for route in routed])  # [b], route-major row positions
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return Condition.cat([route.cond for route in routed]).index(inverse)  # [b]


@torch.no_grad()
def teacher_velocity(
    teacher: FlowPolicy, route: Route, x: Tensor, t: Tensor, target: DistillTeacher
) -> Tensor:
    """The target v_T [b, C, H, W] fp32 at (x [b, C, H, W], t [b]) of one task's rows: the conditional
    ``v_c``, or the guided ``v_u + s (v_c - v_u)`` (`guided_velocity`, one [cond ; uncond] forward)."""
    if target.target == "guided":
        v = guided_velocity(teacher, x, t, route.teacher_cond, route.teacher_uncond, target.guidance)
    else:
        v = teacher.velocity(x, t, route.teacher_cond)
    return v.float()  # [b, C, H, W]


# ------------------------------------------------------------------------------------------- rollout


@torch.no_grad()
def rollout_states(
    policy: FlowPolicy,
    cond: Condition,
    r: DistillRollout,
    generator: torch.Generator,
    noise: Tensor,
    step_noise: dict[int, Tensor] | None = None,
) -> Tensor:
    """The student's trajectory, without grad: all states [N + 1, b, C, H, W] (index 0 is the noise).
    ``step_noise`` {n: [b, C, H, W]}: the SDE noises (else drawn from ``generator``)."""
    if r.sampler == "ode":
        _, states = sample_ode(
            policy, cond, r.num_steps, guidance=r.guidance, shift=r.shift, noise=noise, return_trajectory=True
        )
        return states
    ro = sample_sde(
        policy,
        cond,
        r.num_steps,
        guidance=r.guidance,
        shift=r.shift,
        noise_level=r.noise_level,
        cfg_mode="hybrid" if r.guidance > 1.0 else "none",  # hybrid: the rollout uses the guided velocity
        generator=generator,
        noise=noise,
        keep_all_states=True,
        step_noise=step_noise or None,
        cond_logprobs=False,  # distillation needs the states, not a GRPO ratio
    )
    return ro.states


def trained_steps(batch: int, num_steps: int, k: int, generator: torch.Generator) -> Tensor:
    """[batch, k] long step indices: all N in order (k = N), else k distinct steps per trajectory drawn
    uniformly from the generator (sorted)."""
    if k == num_steps:
        return torch.arange(num_steps).expand(batch, num_steps)  # [B, N]
    scores = torch.rand((batch, num_steps), generator=generator)  # [B, N]
    return scores.argsort(dim=1)[:, :k].sort(dim=1).values  # [B, k]


# -------------------------------------------------------------------------------------------- loop


def distill(recipe: DistillRecipe, resume: bool = False) -> Iterator[dict[str, Any]]:
    """Run on-policy distillation; yield a metrics dict every `log_every` iterations (and eval rows),
    then a `done` summary. Set-up, checkpoints, evaluation, logging and export are the shared loop's
    (`qirl.rl.loop`); this function supplies one iteration (module docstring)."""
    validate(recipe)
    session = Session.start(recipe, resume)
    r, tr = recipe.rollout, recipe.train
    prompts_src = PromptSource(recipe.data.prompts, recipe.data.edit_fraction)
    teachers = load_teachers(recipe, prompts_src.tasks)
    student = session.load(recipe.student, prompts_src.tasks)
    state, world = session.state, session.world
    view, gen, rng = state.view, state.gen, state.rng
    B, M, N, K = tr.prompts_per_iter, tr.micro_batch, r.num_steps, steps_per_traj(recipe)
    lo, hi = session.mine.start, session.mine.stop
    B_local = hi - lo
    img_size = student.image_size  # edit sources are rendered at the decoder's size
    global_chunks = micro_batches(B, M)
    chunks = micro_batches(B_local, M)  # this rank's micro-batches
    grid_t = timesteps(N, r.shift)  # [N + 1]

    def one_iteration(iteration: int) -> dict[str, Any]:
        # 1. prompts and the student's conditions (every rank draws the global batch) ---------------
        all_records = prompts_src.draw(rng, B)
        records = all_records[lo:hi]
        sources = [record_source(rec, img_size) for rec in records]
        # each prompt is encoded once, per task (student and teacher); the rollout reuses the student's
        routed_all = [routes(student, teachers, records[a:b], sources[a:b], recipe.teacher) for a, b in chunks]
        noise = torch.randn((B, *student.latent_shape), generator=gen)[lo:hi]  # [B_local, C, H, W]
        sde = r.sampler == "sde"  # the SDE noises of every step, drawn as one process draws them
        eps = step_noises(gen, global_chunks, list(range(N)), student.latent_shape, lo, hi) if sde else {}
        # 2. student rollouts, no grad ------------------------------------------------------------
        t_roll = time.perf_counter()
        states = [
            rollout_states(
                view,
                rows_condition(student, routed, records[a:b], sources[a:b]),
                r,
                gen,
                noise[a:b],
                {n: e[a:b] for n, e in eps.items()},
            )
            for (a, b), routed in zip(chunks, routed_all, strict=True)
        ]
        rollout_s = time.perf_counter() - t_roll
        steps = trained_steps(B, N, K, gen)[lo:hi]  # [B_local, K]
        # 3. velocity matching on the trained steps -------------------------------------------------
        t_train = time.perf_counter()
        state.opt.zero_grad(set_to_none=True)
        per_row = torch.zeros(B_local)  # [B_local] mean over the row's trained steps of mse_b(n)
        finite = True
        teacher_s = 0.0
        last = (len(chunks) - 1, K - 1, len(routed_all[-1]) - 1)  # DDP all-reduces after this backward
        for c, ((a, b), st) in enumerate(zip(chunks, states, strict=True)):
            routed = routed_all[c]
            for j in range(K):
                n_j = steps[a:b, j]  # [b]
                x_mb = st[n_j, torch.arange(b - a)]  # [b, C, H, W], state n_j of each trajectory
                t_mb = grid_t[n_j]  # [b]
                for q, route in enumerate(routed):
                    x, t = x_mb[route.rows], t_mb[route.rows]  # [b_task, C, H, W], [b_task]
                    t_teach, teacher = time.perf_counter(), teachers[route.task]
                    v_t = teacher_velocity(teacher, route, x, t, recipe.teacher)  # [b_task, C, H, W]
                    teacher_s += time.perf_counter() - t_teach
                    with sync_gradients(view, last=(c, j, q) == last):
                        v_s = view.velocity(x, t, route.cond)  # [b_task, C, H, W], with grad
                        mse = ops.velocity_mse(v_s, v_t)  # loss: mean over rows, per_sample [b_task]
                        # this rank's mean over rows and steps; the gradient average makes it global
                        loss = mse.loss * (len(route.rows) / (B_local * K))
                        if not torch.isfinite(loss):
                            finite = False
                        loss.backward()
                    per_row[a + route.rows] += mse.per_sample.detach().float().cpu() / K
        state.step(finite, iteration, tr)  # a skipped step leaves the weights untouched
        train_s = time.perf_counter() - t_train
        # 4. metrics ---------------------------------------------------------------------------------
        per_row = world.gather_rows(per_row)  # [B]
        row: dict[str, Any] = {"loss": float(per_row.mean())}
        tasks = [rec.task for rec in all_records]
        for task in teachers:
            mask = torch.tensor([tk == task for tk in tasks])
            row[f"loss/{task}"] = float(per_row[mask].mean()) if mask.any() else float("nan")
        row.update({"rollout_s": rollout_s, "train_s": train_s, "teacher_s": teacher_s})
        return row

    yield from session.loop(one_iteration, nfe_per_iteration(recipe))
    yield session.finish(teachers={task: recipe.teachers[task] for task in teachers})
