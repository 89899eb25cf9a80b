"""The `qirl` command line: parse arguments, load the recipe, call the library, render its metrics.

No training logic lives here. User mistakes (`UserError`) end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from qirl.errors import UserError

from .render import err_console, live_metrics, print_rows, print_summary

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="qirl",
    help="Post-train flow-matching image models with RL (the Qwen-Image-2.0-RL pipeline).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the final summary as JSON on stdout.")]
Resume = Annotated[bool, typer.Option(help="Continue the run in run.out_dir from its last checkpoint.")]
Overrides = Annotated[list[str] | None, typer.Argument(help="Recipe overrides, key=value (e.g. train.lr=1e-4).")]


def user_errors(fn: F) -> F:
    """Turn `UserError` (and a full disk) into one line and exit 2; a bug keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            err_console.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # Checkpoints and outputs are written to a temporary name and renamed: nothing is half-written.
            err_console.print(
                f"[red]error:[/red] disk full ({err.strerror}); earlier checkpoints and outputs are intact, "
                "free space and resume with --resume",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted; the last checkpoint is intact (resume with --resume)")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def _setup(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_recipe(
    schema, run, recipe: Path, overrides, resume: bool, title: str, quiet: bool, json_out: bool, nproc: int = 1, check=None
) -> None:
    """Load a training recipe, run its generator with the live view, print the summary.

    ``nproc`` > 1 (outside torchrun): ``check(cfg, nproc)`` validates the recipe here, so a mistake is one
    line and not N tracebacks, then the command line is re-run under torchrun (`_launch`). Under torchrun
    only rank 0 shows progress and prints the summary; the process group is closed at the end.
    """
    from qirl.config import load_recipe

    main_rank = int(os.environ.get("RANK", "0")) == 0
    cfg = load_recipe(schema, recipe, overrides)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        check(cfg, nproc)
        _launch(nproc)
    try:
        summary = live_metrics(run(cfg, resume=resume), title, quiet or json_out or not main_rank)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if main_rank:
        print_summary(summary, json_out, title)


def _recipe_or_override(recipe: Path | None, overrides: list[str] | None) -> tuple[Path | None, list[str] | None]:
    """An optional recipe argument that holds ``key=value`` (and names no file) is the first override."""
    if recipe is not None and "=" in str(recipe) and not recipe.exists():
        return None, [str(recipe), *(overrides or [])]
    return recipe, overrides


def _launch(nproc: int) -> None:
    """Re-run this command line under torchrun with ``nproc`` processes on this node (``--nproc`` removed)
    and exit with its status."""
    import subprocess
    import sys

    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))  # CPU threads per process
    raise typer.Exit(subprocess.call([*cmd, "-m", "qirl.cli", *args], env=env))


Nproc = Annotated[
    int, typer.Option(help="Processes on this node (launches torchrun; the same as torchrun --nproc_per_node N -m qirl.cli ...).")
]


@app.command()
@user_errors
def pretrain(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (e.g. recipes/pretrain.yaml).")],
    overrides: Overrides = None,
    resume: Resume = False,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Flow-matching pretraining of the tiny unified DiT on the Shapes world (T2I + edit)."""
    from qirl.pretrain import PretrainRecipe
    from qirl.pretrain import pretrain as run

    _run_recipe(PretrainRecipe, run, recipe, overrides, resume, "pretrain", quiet, json_out)


@app.command()
@user_errors
def sample(
    model: Annotated[
        str, typer.Option(help="'base' (shipped), a run directory, a model folder or a diffusers pipeline folder.")
    ] = "base",
    prompts: Annotated[
        str | None, typer.Option(help="Prompt JSONL, or a built-in set: heldout-t2i, heldout-edit, demo.")
    ] = None,
    prompt: Annotated[list[str] | None, typer.Option(help="A T2I prompt (repeatable).")] = None,
    source: Annotated[Path | None, typer.Option(help="Source image for --prompt edits (makes them edits).")] = None,
    out: Annotated[Path, typer.Option(help="Output folder (images, grid.png, samples.jsonl).")] = Path("runs/samples"),
    per_prompt: Annotated[int, typer.Option(help="Images per prompt (different noise).")] = 1,
    limit: Annotated[int | None, typer.Option(help="Use only the first N prompts.")] = None,
    steps: Annotated[int, typer.Option(help="Euler ODE steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="CFG scale (1 = no guidance).")] = 3.0,
    shift: Annotated[float, typer.Option(help="Flow-matching time shift.")] = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Weights: float32, bfloat16 or float16.")] = "float32",
    resolution: Annotated[int, typer.Option(help="Image side in pixels for a diffusers pipeline (0: its default).")] = 0,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Generate images (T2I) or edits (instruction + source) and a grid from a model."""
    from qirl.data import PromptRecord
    from qirl.models.registry import PolicyOptions
    from qirl.prompt_sets import resolve_prompts
    from qirl.samples import SampleOptions, generate

    if prompt:
        if prompts:
            raise UserError("give --prompts or --prompt, not both")
        task = "edit" if source is not None else "t2i"
        records = [PromptRecord(prompt=p, task=task, source=str(source) if source else None) for p in prompt]
    else:
        records = resolve_prompts(prompts or "demo")
    if limit is not None:
        records = records[:limit]
    opts = SampleOptions(
        steps=steps,
        guidance=guidance,
        shift=shift,
        seed=seed,
        per_prompt=per_prompt,
        batch_size=batch_size,
        policy=PolicyOptions(device=device, dtype=dtype, resolution=resolution),
    )
    summary = live_metrics(generate(model, records, out, opts), "sample", quiet or json_out)
    print_summary(summary, json_out, "sample")


score_app = typer.Typer(
    help="Reward models: score images, make annotations, train and evaluate reward models, serve them.",
    no_args_is_help=True,
)
app.add_typer(score_app, name="score")


def _composite(rewards: list[str] | None, recipe: Path | None):
    """A composite from `--reward` names (weight 1 each) or from the `rewards:` section of a YAML file."""
    from qirl.config import load_recipe
    from qirl.rewards.composite import CompositeConfig, CompositeReward, parse_reward_spec

    if rewards and recipe:
        raise UserError("give --reward or --rewards-recipe, not both")
    if recipe is not None:
        import yaml

        from qirl.files import read_text

        raw = yaml.safe_load(read_text(recipe, "rewards recipe")) if recipe.is_file() else None
        if isinstance(raw, dict) and "rewards" in raw:
            # A whole training recipe: read only its rewards section.
            from omegaconf import OmegaConf

            tmp = OmegaConf.create(raw["rewards"])
            cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(CompositeConfig), tmp))
        else:
            cfg = load_recipe(CompositeConfig, recipe)
        return CompositeReward.from_config(cfg)
    if rewards:
        return CompositeReward.from_config(CompositeConfig(models=[parse_reward_spec(r) for r in rewards]))
    return None


@score_app.command("images")
@user_errors
def score_images_cmd(
    path: Annotated[Path, typer.Argument(help="A folder written by `qirl sample`, or a JSONL of images.")],
    reward: Annotated[
        list[str] | None, typer.Option(help="A reward model: name or name:key=value,... (repeatable).")
    ] = None,
    rewards_recipe: Annotated[Path | None, typer.Option(help="YAML with a composite (`models`, `category_weights`).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output JSONL (default: scores.jsonl beside the manifest).")] = None,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Score images with the Shapes oracle (always) and any reward models; write scores.jsonl."""
    from qirl.rewards.scoring import score_images

    composite = _composite(reward, rewards_recipe)
    summary = live_metrics(score_images(path, composite, out), "score", quiet or json_out)
    print_summary(summary, json_out, "scores")


@score_app.command("annotate")
@user_errors
def score_annotate(
    recipe: Annotated[Path | None, typer.Argument(help="Optional YAML of AnnotateConfig keys.")] = None,
    overrides: Overrides = None,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Synthetic human-like annotations (pointwise Likert + pairwise preferences) from one image pool."""
    from qirl.config import load_recipe
    from qirl.rewards.annotate import AnnotateConfig, annotate

    recipe, overrides = _recipe_or_override(recipe, overrides)
    cfg = load_recipe(AnnotateConfig, recipe, overrides)
    summary = live_metrics(annotate(cfg), "annotate", quiet or json_out)
    print_summary(summary, json_out, "annotations")


@score_app.command("train")
@user_errors
def score_train(
    recipe: Annotated[Path, typer.Argument(help="Reward-model recipe (e.g. recipes/rm_pointwise.yaml).")],
    overrides: Overrides = None,
    resume: Resume = False,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Fine-tune a VLM reward model, pointwise (Likert distribution, optional CoT) or pairwise (Bradley-Terry)."""
    from qirl.rewards.vlm import RewardTrainRecipe, train_reward_model

    _run_recipe(RewardTrainRecipe, train_reward_model, recipe, overrides, resume, "train reward model", quiet, json_out)


@score_app.command("pretrain")
@user_errors
def score_pretrain(
    recipe: Annotated[Path, typer.Argument(help="Caption-pretraining recipe (e.g. recipes/vlm_pretrain.yaml).")],
    overrides: Overrides = None,
    resume: Resume = False,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Caption-pretrain the embedded VLM on Shapes renders: the perception a reward model starts from."""
    from qirl.rewards.vlm.pretrain import CaptionPretrainRecipe, pretrain_vlm

    _run_recipe(CaptionPretrainRecipe, pretrain_vlm, recipe, overrides, resume, "caption pretraining", quiet, json_out)


@score_app.command("eval")
@user_errors
def score_eval(
    model: Annotated[Path, typer.Argument(help="A trained reward model folder (<run>/model).")],
    data: Annotated[Path, typer.Option(help="Annotation folder written by `qirl score annotate`.")] = Path(
        "data/annotations"
    ),
    max_rows: Annotated[int, typer.Option(help="Evaluate on at most N rows per split (0 = all).")] = 0,
    dimension: Annotated[
        list[str] | None,
        typer.Option(help="Pointwise question(s) to ask, `dim` or `dim=weight` (repeatable): several "
                     "score their weighted mean, the composite a GRPO recipe trains on."),
    ] = None,
    json_out: AsJson = False,
) -> None:
    """Held-out pairwise accuracy against the oracle's preference and Spearman against oracle scores."""
    from qirl.rewards.vlm import DimensionMean, VLMReward, evaluate_reward_model

    if not (model / "config.json").exists() and (model / "model").is_dir():
        model = model / "model"
    reward = VLMReward.load(str(model))
    scorer = DimensionMean.parse(reward, dimension) if dimension else reward
    result = evaluate_reward_model(scorer, str(data), max_rows=max_rows)
    extra = {"dimensions": ",".join(dimension)} if dimension else {}
    print_summary({"model": str(model), **extra, **result}, json_out, "reward model vs oracle")


@score_app.command("mismatch")
@user_errors
def score_mismatch(
    src: Annotated[Path, typer.Argument(help="Annotation folder written by `qirl score annotate`.")],
    out: Annotated[Path, typer.Option(help="Output annotation folder (a round to add to data.path).")],
    fraction: Annotated[float, typer.Option(help="Share of each pointwise split's T2I rows to re-caption.")] = 0.5,
    seed: int = 0,
    json_out: AsJson = False,
) -> None:
    """Rate the same images against other prompts: hard negatives that make a reward model read the prompt."""
    from qirl.rewards.mismatch import mismatch

    summary = mismatch(src, out, fraction=fraction, seed=seed)
    print_summary({k: v for k, v in summary.items() if k not in ("counts", "oracle_mean")}
                  | {f"rows_{k}": v for k, v in summary["counts"].items()}, json_out, "mismatched captions")


@score_app.command("serve")
@user_errors
def score_serve(
    reward: Annotated[list[str] | None, typer.Option(help="A reward model by name (repeatable).")] = None,
    rewards_recipe: Annotated[Path | None, typer.Option(help="YAML with a composite (`models`, ...).")] = None,
    host: Annotated[str, typer.Option(help="Bind address (loopback by default).")] = "127.0.0.1",
    port: int = 8000,
    token_env: Annotated[
        str, typer.Option(help="Environment variable holding the bearer token (unset: no token).")
    ] = "QIRL_REWARD_TOKEN",
    max_batch: int = 256,
    workers: Annotated[int, typer.Option(help="Scoring threads.")] = 1,
) -> None:
    """Serve reward models over HTTP (JSON + base64 PNG, never pickle): POST /score, GET /health."""
    from qirl.rewards.server import serve

    composite = _composite(reward, rewards_recipe) or _composite(["oracle"], None)
    token = os.environ.get(token_env) or None
    err_console.print(f"serving {', '.join(composite.names)} on http://{host}:{port} (token: {'yes' if token else 'no'})")
    serve(dict(zip(composite.names, composite.rewards, strict=True)), host=host, port=port, token=token,
          max_batch=max_batch, workers=workers)


@score_app.command("list")
def score_list() -> None:
    """List the reward models that can be named in recipes and --reward."""
    from qirl.rewards.base import available_rewards

    for name in available_rewards():
        typer.echo(name)


@app.command()
@user_errors
def curate(
    prompts: Annotated[str, typer.Argument(help="Prompt JSONL (or a built-in set) to curate.")],
    recipe: Annotated[Path | None, typer.Argument(help="Curation recipe (e.g. recipes/curate.yaml).")] = None,
    overrides: Overrides = None,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Keep prompts whose intra-group reward range reaches a threshold; calibrate per-category weights."""
    from qirl.config import load_recipe
    from qirl.rl.curate import CurateRecipe
    from qirl.rl.curate import curate as run

    recipe, overrides = _recipe_or_override(recipe, overrides)
    cfg = load_recipe(CurateRecipe, recipe, [*(overrides or []), f"prompts={prompts}"])
    summary = live_metrics(run(cfg), "curate", quiet or json_out)
    if not json_out:
        summary = {k: v for k, v in summary.items() if k != "per_prompt"}
    print_summary(summary, json_out, "curation")


@app.command()
@user_errors
def grpo(
    recipe: Annotated[Path, typer.Argument(help="GRPO recipe (e.g. recipes/t2i.yaml).")],
    overrides: Overrides = None,
    resume: Resume = False,
    quiet: Quiet = False,
    json_out: AsJson = False,
    nproc: Nproc = 1,
) -> None:
    """GRPO for flow matching: SDE rollouts with hybrid CFG, group-relative multi-reward advantage."""
    from qirl.rl.grpo import GrpoRecipe, validate
    from qirl.rl.grpo import grpo as run

    _run_recipe(GrpoRecipe, run, recipe, overrides, resume, "grpo", quiet, json_out, nproc, validate)


@app.command()
@user_errors
def distill(
    recipe: Annotated[
        Path | None, typer.Argument(help="Distillation recipe: a file or built-in name (default: the built-in distill).")
    ] = None,
    overrides: Overrides = None,
    teachers: Annotated[
        str | None,
        typer.Option(
            help="Tasks to distill, comma-separated: TASK (the recipe's teachers.TASK) or TASK=PATH (a model or "
            "run folder), e.g. t2i,edit or t2i=runs/x,edit. Default: every teacher in the recipe."
        ),
    ] = None,
    resume: Resume = False,
    quiet: Quiet = False,
    json_out: AsJson = False,
    nproc: Nproc = 1,
) -> None:
    """On-policy distillation: one student matches each task's RL teacher's velocity on its own trajectories."""
    from qirl.rl.distill import DistillRecipe, select_teachers, validate
    from qirl.rl.distill import distill as run

    def run_selected(cfg: DistillRecipe, resume: bool = False):
        return run(select_teachers(cfg, teachers), resume=resume)

    def check(cfg: DistillRecipe, n: int) -> None:
        validate(select_teachers(cfg, teachers), world_size=n)

    recipe, overrides = _recipe_or_override(recipe, overrides)
    recipe = recipe if recipe is not None else Path("distill")
    _run_recipe(DistillRecipe, run_selected, recipe, overrides, resume, "distill", quiet, json_out, nproc, check)


@app.command()
@user_errors
def consolidate(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder (run/checkpoints/step_N) written sharded.")],
    out: Annotated[Path, typer.Argument(help="The safetensors file to write.")],
    group: Annotated[str, typer.Option(help="model (the trained weights), ema or optimizer.")] = "model",
) -> None:
    """Gather a sharded (run.checkpoint_format=sharded) checkpoint into one safetensors file."""
    from qirl.checkpoint import consolidate as run

    err_console.print(f"wrote {run(checkpoint, out, group)}")


recipes_app = typer.Typer(help="The built-in recipes: list them, copy one out to edit.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
@user_errors
def recipes_list(json_out: AsJson = False) -> None:
    """Every built-in recipe: its name (what the commands take), what it runs and the command in its header."""
    from qirl.builtin_recipes import list_recipes

    rows = list_recipes()
    if json_out:
        print_rows([r.__dict__ for r in rows], True, "recipes")
        return
    print_rows([{"name": r.name, "runs": r.runs, "command": r.command} for r in rows], False, "recipes")  # --json: + about


@recipes_app.command("cp")
@user_errors
def recipes_cp(
    name: Annotated[str, typer.Argument(help="A built-in recipe (qirl recipes list).")],
    dest: Annotated[Path, typer.Argument(help="File or folder to copy it to (an existing file is kept).")],
) -> None:
    """Copy a built-in recipe out for editing; run the copy by its path."""
    from qirl.builtin_recipes import copy_recipe

    err_console.print(f"wrote {copy_recipe(name, dest)}")


eval_app = typer.Typer(
    help="Evaluate models: benchmark pillars, Elo / Bradley-Terry arenas, offline reports.", no_args_is_help=True
)
app.add_typer(eval_app, name="eval")

EvalModels = Annotated[
    list[str] | None,
    typer.Option(
        "--model", "--models",
        help="MODEL or LABEL=MODEL, optionally with @steps=N@guidance=S@shift=F (and @resolution=PX@dtype=bfloat16 "
        "for a diffusers pipeline); MODEL: 'base', a model, run or pipeline folder. Comma-separated and repeatable.",
    ),
]
Judge = Annotated[list[str] | None, typer.Option(help="Judge: 'oracle' or a reward model name[:key=value,...] (repeatable).")]
Steps = Annotated[int, typer.Option(help="Euler ODE steps (default for every model).")]
Guidance = Annotated[float, typer.Option(help="CFG scale (default for every model).")]
Shift = Annotated[float, typer.Option(help="Flow-matching time shift (default for every model).")]
NPrompts = Annotated[int | None, typer.Option(help="Use only the first N prompts of the set.")]
Bootstrap = Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals (0 = none).")]


@eval_app.command("bench")
@user_errors
def eval_bench(
    model: EvalModels = None,
    task: Annotated[str, typer.Option(help="t2i, edit or all.")] = "all",
    out: Annotated[Path, typer.Option(help="Output folder (bench.json, scores.jsonl, grids/).")] = Path("runs/bench"),
    judge: Judge = None,
    seeds: Annotated[int, typer.Option(help="Images per prompt (seeds 0..N-1).")] = 3,
    n_prompts: NPrompts = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt JSONL or built-in set (default: heldout-t2i / heldout-edit).")] = None,
    steps: Steps = 20,
    guidance: Guidance = 3.0,
    shift: Shift = 1.0,
    bootstrap: Bootstrap = 1000,
    batch_size: int = 64,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Qwen-Image-Bench pillars (T2I) and success / preservation / quality (edit), with 95% intervals."""
    from qirl.eval.bench import flat_summary, run_bench
    from qirl.eval.models import Sampling

    stream = run_bench(
        model or ["base"], out, task, n_prompts, seeds, judge or ["oracle"], Sampling(steps, guidance, shift),
        prompts, bootstrap, batch_size,
    )
    summary = live_metrics(stream, "bench", quiet or json_out)
    print_summary(summary if json_out else flat_summary(summary), json_out, "bench")


@eval_app.command("arena")
@user_errors
def eval_arena(
    models: EvalModels = None,
    task: Annotated[str | None, typer.Option(help="t2i or edit (default: the folder's, else t2i).")] = None,
    out: Annotated[Path, typer.Option(help="Arena folder (votes.jsonl, arena.json); extended if it exists.")] = Path(
        "runs/arena"
    ),
    judge: Annotated[
        list[str] | None,
        typer.Option(help="annotators (oracle + noise, default), oracle, human (writes vote.html), or reward name[:k=v].")
    ] = None,
    votes: Annotated[list[Path] | None, typer.Option(help="Add votes from a JSONL file (repeatable).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per prompt (0..N-1).")] = 1,
    n_prompts: NPrompts = None,
    prompts: Annotated[str | None, typer.Option(help="Prompt JSONL or built-in set.")] = None,
    steps: Steps = 20,
    guidance: Guidance = 3.0,
    shift: Shift = 1.0,
    noise: Annotated[float, typer.Option(help="Simulated annotators' perception noise (sd, score points).")] = 8.0,
    tie_margin: Annotated[float, typer.Option(help="A vote is a tie when scores differ by less (points).")] = 2.0,
    judge_seed: Annotated[int, typer.Option(help="Seed of the simulated annotators.")] = 0,
    k: Annotated[float, typer.Option("--k", help="Online Elo K factor.")] = 16.0,
    bootstrap: Bootstrap = 1000,
    anchor: Annotated[str | None, typer.Option(help="Model fixed at --anchor-rating (default: the first).")] = None,
    anchor_rating: float = 1000.0,
    batch_size: int = 64,
    quiet: Quiet = False,
    json_out: AsJson = False,
) -> None:
    """Pairwise arena: same prompts and seeds for every model, votes, Elo and Bradley-Terry with 95% intervals."""
    from qirl.eval.arena import flat_summary, run_arena
    from qirl.eval.judges import VotePolicy
    from qirl.eval.models import Sampling

    stream = run_arena(
        out, models or [], task, judge or ["annotators"], votes or [], n_prompts, seeds, prompts,
        Sampling(steps, guidance, shift), VotePolicy(noise, tie_margin, judge_seed), k, bootstrap, anchor,
        anchor_rating, batch_size,
    )
    summary = live_metrics(stream, "arena", quiet or json_out)
    print_summary(summary if json_out else flat_summary(summary), json_out, "arena")


@eval_app.command("seeds")
@user_errors
def eval_seeds(
    bench: Annotated[Path, typer.Argument(help="A bench folder whose models include each arm's training seeds.")],
    arm: Annotated[
        list[str], typer.Option(help="NAME=LABEL[,LABEL...]: the bench labels of one recipe's training seeds (repeatable).")
    ],
    json_out: AsJson = False,
) -> None:
    """A recipe over its training seeds: mean paired change over the bench's first model, 95% t interval."""
    from qirl.eval.seeds import flat_rows, seed_summary

    summary = seed_summary(bench, arm)
    print_rows(summary["rows"] if json_out else flat_rows(summary), json_out, f"training seeds ({bench})")


@eval_app.command("report")
@user_errors
def eval_report(
    inputs: Annotated[list[Path], typer.Argument(help="Bench and arena folders.")],
    out: Annotated[Path, typer.Option(help="Report folder (report.md, report.html, figures/).")] = Path("runs/report"),
    title: str = "qirl evaluation",
    json_out: AsJson = False,
) -> None:
    """Markdown and a self-contained HTML report (tables, pillar bars, ratings, win rates, sample grids)."""
    from qirl.eval.report import build_report

    print_summary(build_report(inputs, out, title), json_out, "report")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
