"""Synthetic human-like annotations of Shapes images, to train reward models the way the report does.

The Qwen-Image-2.0-RL report trains its VLM reward models on human annotations of AIGC images: a
pointwise set (5-point Likert ratings of Quality and Fidelity) and a pairwise set (same-prompt pairs
judged by the strict priority order image-text consistency > structural distortion > texture quality >
aesthetic appeal, with auxiliary labels for sample validity, text distortion and human-figure
distortion), both drawn from ONE image pool so that the comparison isolates the training paradigm.
This module builds the Shapes analogue, with the oracle as the annotators' eyes and a stated noise
model as their hands.

Image pool (per prompt, `samples_per_prompt` images). The base model's own samples at every
(CFG scale, step count) of the config, cycled over the prompts so each prompt sees a spread (few steps
and no guidance give poor images, many steps and guidance good ones), plus perturbed renders of the
ground-truth scene: the clean render, Gaussian blur, pixel noise, a colour shift, a wrong / missing /
extra object, a distorted (warped or fragmented) shape, and for edits the unchanged source (an edit
that was not done). Edits use the instruction's target scene as the ground truth. Every image is
quantised to 8 bits before it is judged, so the labels describe exactly the PNG a trainer reads.
Cost: the model samples dominate. A sample at guidance g and n steps costs n forwards, 2n when g > 1
(one batched [cond; uncond] pass); the default grid averages 18.9 image-forwards per sample, so the
default pool (1200 samples + 1200 renders) is ~22,600 image-forwards of the tiny DiT.

Truth (`qirl.shapes.judge`: `judge_t2i`, `judge_edit`): the oracle's pillars on 0-100, grouped into the
report's four levels consistency, distortion, texture and aesthetics, plus `valid`, `figure_distortion`
and the `reasons` a chain-of-thought model learns to write. The perturbed renders are
`qirl.shapes.perturb`.

The annotator model. Pointwise labels: the latent score of a dimension (quality = mean of texture and
aesthetics; fidelity = distortion; alignment = consistency) is perceived with Gaussian noise,
s' = s + N(0, likert_noise^2) on the 0-100 scale, cut into 1..5 at LIKERT_CUTS

    1: s' < 25    2: 25 <= s' < 50    3: 50 <= s' < 75    4: 75 <= s' < 95    5: s' >= 95

(5 is reserved for a flawless image: one partial item out of four already gives 90), and with
probability `slip_rate` the annotator then slips one point up or down (inwards at 1 and 5). Pairwise
labels follow the priority order exactly (`prefer`): the first level, in order, whose difference
|a - b| reaches `tie_threshold` points decides (label 1.0 when a is better, 0.0 when b is) and is
recorded as the `reason`; if no level does, the pair is a tie (0.5, reason "tie"). With probability
`flip_rate` the annotator then flips a decided label; ties stay ties (identical images are always
ties). Pair-level auxiliary labels: `valid` = both images valid; `figure_distortion` = either image
has a distorted figure; `text_distortion` is always False, because Shapes images contain no text.

Dataset (`datasets.DatasetDict`, `save_to_disk(out_dir)`, schema `POINTWISE_FEATURES` and
`PAIRWISE_FEATURES`): splits `pointwise`, `pointwise_test`, `pairwise`, `pairwise_test`; the test
splits hold the images of a disjoint set of prompts (prompt strings are unique over the whole set).
`out_dir/annotations.json` summarises counts, label histograms, tie rate, noise settings, and the
agreement of the noisy labels with the noiseless ones. The folder is written under a temporary name
and renamed into place at the end, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations, product
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from qirl.data import publish_mode
from qirl.errors import UserError
from qirl.shapes import Scene, random_edit_record, random_t2i_record, render
from qirl.shapes.judge import LEVELS, Truth, judge_edit, judge_t2i
from qirl.shapes.perturb import EXTRA_PERTURBATIONS, PERTURBATIONS, perturb
from qirl.stats import spearman

__all__ = [
    "LIKERT_CUTS", "LIKERT_DIMS", "PAIRWISE_FEATURES", "POINTWISE_FEATURES", "AnnotateConfig", "annotate",
    "draw_prompts", "likert", "noisy_likert", "prefer",
]

LIKERT_CUTS: tuple[float, float, float, float] = (25.0, 50.0, 75.0, 95.0)
_T2I_PERTURBATIONS = PERTURBATIONS[1:-1]  # "clean" comes first in every pool; "unchanged" is edit-only
_EDIT_PERTURBATIONS = PERTURBATIONS[1:]
_CREATIVE_SHARE = 1 / 6  # share of T2I prompts with a held-out (shape, colour) pair, as in builtin_prompts

POINTWISE_FEATURES = datasets.Features({
    "image": datasets.Image(),
    "prompt": datasets.Value("string"),
    "task": datasets.Value("string"),
    "category": datasets.Value("string"),
    "source_image": datasets.Image(),
    "quality": datasets.Value("int32"),
    "fidelity": datasets.Value("int32"),
    "alignment": datasets.Value("int32"),
    "oracle": datasets.Value("float32"),
    "reasons": datasets.List(datasets.Value("string")),
})
PAIRWISE_FEATURES = datasets.Features({
    "prompt": datasets.Value("string"),
    "task": datasets.Value("string"),
    "category": datasets.Value("string"),
    "image_a": datasets.Image(),
    "image_b": datasets.Image(),
    "source_image": datasets.Image(),
    "label": datasets.Value("float32"),
    "reason": datasets.Value("string"),
    "oracle_a": datasets.Value("float32"),
    "oracle_b": datasets.Value("float32"),
    "valid": datasets.Value("bool"),
    "text_distortion": datasets.Value("bool"),
    "figure_distortion": datasets.Value("bool"),
})
LIKERT_DIMS: tuple[str, ...] = ("quality", "fidelity", "alignment")


@dataclass
class AnnotateConfig:
    """What `annotate` builds; every field can be set from a recipe or `key=value` overrides."""

    # The policy whose samples fill the pool (models.registry.load_policy: base, a model, a run or one of
    # its checkpoints); comma-separated for several (e.g. "base,runs/grpo_t2i": an on-policy round whose
    # same-prompt pairs compare the policy with the base): pool slot k of a prompt comes from model k mod M.
    model: str = "base"
    out_dir: str = "data/annotations"
    n_prompts: int = 200  # T2I prompts and edit instructions together, train and test
    samples_per_prompt: int = 12  # pool images per prompt: model samples + perturbed renders
    perturbed_fraction: float = 0.5  # share of the pool that is perturbed ground-truth renders
    guidance: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])  # CFG scales to sample at
    steps: list[int] = field(default_factory=lambda: [4, 10, 20])  # Euler step counts to sample at
    shift: float = 1.0
    # 0: deterministic Euler samples. > 0: GRPO-style SDE samples (`sample_sde`, this noise level, SDE
    # steps 0..sde_window-1, CFG in the rollout), i.e. the images a GRPO run actually scores.
    noise_level: float = 0.0
    sde_window: int = 4
    # With noise_level > 0: a prompt's model samples share their initial noise and differ only by their
    # SDE noises, as a GRPO group does (`sampling.shared_noise`), so the pairs teach the fine
    # distinctions GRPO's per-group advantage acts on.
    shared_noise: bool = False
    edit_fraction: float = 0.25  # share of prompts that are edit instructions
    test_fraction: float = 0.1  # share of prompts held out for the *_test splits
    pairs_per_prompt: int = 16  # same-prompt pairs drawn from each pool (at most all of them)
    likert_noise: float = 8.0  # sd of the annotator's perception noise, in oracle points (0-100)
    slip_rate: float = 0.05  # probability of an off-by-one Likert slip
    flip_rate: float = 0.05  # probability of flipping a decided pairwise label
    tie_threshold: float = 5.0  # a level decides a pair when the scores differ by at least this
    # Perturbation kinds of the render pool (after each prompt's clean render); empty: all of
    # PERTURBATIONS that fit the task. Naming kinds (for example [blank]) builds a small easy set for tests.
    perturbations: list[str] = field(default_factory=list)
    batch_size: int = 64
    seed: int = 0

    def validate(self) -> None:
        """Raise `UserError` naming the first bad key."""
        if self.n_prompts < 2:
            raise UserError(f"n_prompts must be at least 2 (train and test), got {self.n_prompts}")
        if self.samples_per_prompt < 2:
            raise UserError(f"samples_per_prompt must be at least 2 (a pair needs two), "
                            f"got {self.samples_per_prompt}")
        for key in ("perturbed_fraction", "edit_fraction", "slip_rate", "flip_rate"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"{key} must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.shared_noise and self.noise_level <= 0:
            raise UserError("shared_noise needs noise_level > 0 (ODE samples from one noise are identical)")
        if self.noise_level < 0 or self.sde_window < 1:
            raise UserError(f"noise_level must be >= 0 and sde_window >= 1, got {self.noise_level}, "
                            f"{self.sde_window}")
        if self.likert_noise < 0 or self.tie_threshold < 0:
            raise UserError("likert_noise and tie_threshold must be non-negative")
        if self.pairs_per_prompt < 1 or self.batch_size < 1:
            raise UserError("pairs_per_prompt and batch_size must be at least 1")
        if self.n_model_samples > 0 and (not self.guidance or not self.steps):
            raise UserError("guidance and steps must each list a value when the pool has model samples")
        known = PERTURBATIONS[1:] + EXTRA_PERTURBATIONS
        if bad := [k for k in self.perturbations if k not in known]:
            raise UserError(f"perturbations: unknown kind(s) {', '.join(map(str, bad))}; "
                            f"expected some of {', '.join(known)}")
        if any(s < 1 for s in self.steps):
            raise UserError(f"steps must all be at least 1, got {list(self.steps)}")

    @property
    def n_model_samples(self) -> int:
        return self.samples_per_prompt - round(self.samples_per_prompt * self.perturbed_fraction)


# -------------------------------------------------------------------------------------- labels


def likert(score: float) -> int:
    """0-100 -> 1..5 at LIKERT_CUTS (see the module docstring)."""
    return 1 + sum(score >= c for c in LIKERT_CUTS)


def noisy_likert(score: float, rng: np.random.Generator, noise: float, slip_rate: float) -> int:
    """One annotator's rating: `likert(score + N(0, noise^2))`, then a +-1 slip with prob `slip_rate`.

    Both random draws are always made, so the stream of an rng does not depend on the settings.
    """
    label = likert(score + noise * float(rng.standard_normal()))
    slip, up = rng.random() < slip_rate, rng.random() < 0.5
    if slip:
        label += 1 if (up or label == 1) and label < 5 else -1
    return int(label)


def prefer(a: Truth, b: Truth, tie_threshold: float) -> tuple[float, str]:
    """Noiseless pairwise preference by the report's strict priority order.

    Levels in order consistency > distortion > texture > aesthetics; the first with
    |a - b| >= tie_threshold decides: (1.0, level) if a is better, (0.0, level) if b is; none -> (0.5, "tie").
    """
    for level in LEVELS:
        d = getattr(a, level) - getattr(b, level)
        if abs(d) >= tie_threshold and d != 0:
            return (1.0 if d > 0 else 0.0), level
    return 0.5, "tie"


# ------------------------------------------------------------------------------------------ pool


@dataclass
class _PoolImage:
    prompt: int  # index into the prompt list
    slot: int  # position in that prompt's pool
    origin: str  # "model g=<scale> steps=<n>" or "render:<perturbation>"
    pixels: np.ndarray  # uint8 [H, W, 3]: exactly what the PNG holds


def _quantise(img: np.ndarray) -> np.ndarray:
    """float [H, W, 3] -> uint8, as an 8-bit PNG stores it."""
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _as_float(px: np.ndarray) -> np.ndarray:
    return px.astype(np.float32) / 255.0


def _png(px: np.ndarray) -> dict[str, Any]:
    buf = io.BytesIO()
    Image.fromarray(px, mode="RGB").save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def draw_prompts(config: AnnotateConfig) -> tuple[list[dict[str, Any]], list[bool]]:
    """`n_prompts` Shapes records with unique prompt strings, and which of them are test prompts.

    T2I records carry their ground-truth `scene`, edits their `source_scene` and `target_scene`.
    """
    rng = np.random.default_rng([config.seed, 0xA11])
    records: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(50 * config.n_prompts):
        if len(records) == config.n_prompts:
            break
        if rng.random() < config.edit_fraction:
            rec = random_edit_record(rng, split="train")
        else:
            rec = random_t2i_record(rng, split="creative" if rng.random() < _CREATIVE_SHARE else "train")
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            records.append(rec)
    if len(records) < config.n_prompts:
        raise UserError(f"n_prompts={config.n_prompts}: found only {len(records)} distinct prompts")
    n_test = min(config.n_prompts - 1, max(1, round(config.test_fraction * config.n_prompts)))
    test = np.zeros(config.n_prompts, dtype=bool)
    test[rng.permutation(config.n_prompts)[:n_test]] = True
    return records, test.tolist()


def _sample_pool(
    config: AnnotateConfig, policies: list[Any], records: list[dict[str, Any]], sources: list[np.ndarray | None]
) -> Iterator[list[_PoolImage]]:
    """The models' samples, one list per batch: sample k of prompt i comes from model k mod M, uses the
    (guidance, steps) pair number (i * n_model + k) mod |grid| and the initial noise
    `image_noise(seed, i * pool + k)`, so the noises do not depend on the batch size (the 8-bit images
    can still differ by a rounding between batch sizes)."""
    n_model = config.n_model_samples
    grid = list(product(config.guidance, config.steps))
    jobs = [(i, k, (i * n_model + k) % len(grid)) for i in range(len(records)) for k in range(n_model)]
    for m, policy in enumerate(policies):
        label = "model" if len(policies) == 1 else f"model {m}"
        mine = [(i, k, c) for i, k, c in jobs if k % len(policies) == m]
        yield from _sample_one_model(config, policy, label, mine, records, sources)


def _sample_one_model(
    config: AnnotateConfig, policy: Any, label: str, jobs: list[tuple[int, int, int]],
    records: list[dict[str, Any]], sources: list[np.ndarray | None],
) -> Iterator[list[_PoolImage]]:
    from qirl.prompt_sets import image_noise
    from qirl.sampling import sample_ode, sample_sde

    pool = config.samples_per_prompt
    grid = list(product(config.guidance, config.steps))
    shape = tuple(policy.latent_shape)
    for c, (g, steps) in enumerate(grid):
        mine = [(i, k) for i, k, cc in jobs if cc == c]
        for start in range(0, len(mine), config.batch_size):
            chunk = mine[start : start + config.batch_size]
            src = [None if sources[i] is None else torch.from_numpy(_as_float(sources[i])).permute(2, 0, 1)
                   for i, _ in chunk]
            with torch.no_grad():
                cond = policy.encode([records[i]["prompt"] for i, _ in chunk], src)
                noise = torch.stack([image_noise(config.seed, i * pool + (0 if config.shared_noise else k), shape)
                                     for i, k in chunk])
                if config.noise_level > 0:
                    window = list(range(min(config.sde_window, int(steps))))
                    # Per-image step noises (seeded by image, like the initial noise): batch-size free.
                    step_noise = {n: torch.stack([image_noise(config.seed + 7919 * (n + 1), i * pool + k, shape)
                                                  for i, k in chunk]) for n in window}
                    latents = sample_sde(policy, cond, num_steps=int(steps), guidance=float(g),
                                         shift=config.shift, noise_level=config.noise_level,
                                         sde_window=window, noise=noise, step_noise=step_noise,
                                         cond_logprobs=False).latents  # [b, C, H, W]
                else:
                    latents = sample_ode(policy, cond, num_steps=int(steps), guidance=float(g),
                                         shift=config.shift, noise=noise)  # [b, C, H, W]
                images = policy.decode(latents).float().clamp(0, 1)  # [b, 3, H, W]
            pixels = images.permute(0, 2, 3, 1).cpu().numpy()  # [b, H, W, 3]
            kind = f" sde={config.noise_level:g}" if config.noise_level > 0 else ""
            yield [_PoolImage(i, k, f"{label} g={g:g} steps={steps}{kind}", _quantise(px))
                   for (i, k), px in zip(chunk, pixels, strict=True)]


def _render_pool(config: AnnotateConfig, records: list[dict[str, Any]], size: int) -> list[_PoolImage]:
    """The perturbed renders: per prompt the clean render, then perturbations in a shuffled cycle."""
    out = []
    for i, rec in enumerate(records):
        rng = np.random.default_rng([config.seed, i, 1])
        edit = rec["task"] == "edit"
        truth = Scene.from_dict(rec["target_scene"] if edit else rec["scene"])
        source = Scene.from_dict(rec["source_scene"]) if edit else None
        kinds = list(_EDIT_PERTURBATIONS if edit else _T2I_PERTURBATIONS)
        if config.perturbations:
            kinds = [k for k in config.perturbations if edit or k != "unchanged"] or ["clean"]
        cycle = ["clean"] + [kinds[j] for j in rng.permutation(len(kinds))]
        for k in range(config.n_model_samples, config.samples_per_prompt):
            kind = cycle[(k - config.n_model_samples) % len(cycle)]
            img = perturb(truth, kind, size, rng, source)
            out.append(_PoolImage(i, k, f"render:{kind}", _quantise(img)))
    return out


# ------------------------------------------------------------------------------------------ main


def _hist(values: Sequence[Any], keys: Sequence[Any]) -> dict[str, int]:
    counts = Counter(values)
    return {str(k): int(counts.get(k, 0)) for k in keys}


def _r(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def annotate(config: AnnotateConfig) -> Iterator[dict[str, Any]]:
    """Build the pool, judge it, label it like human annotators, and save the DatasetDict.

    Yields progress dicts {"phase", "step", "total"} (step counts pool images made, then judged) and a
    final {"done": True, ...} summary; `out_dir` holds the dataset and `annotations.json` only at the end.
    """
    from qirl.models.registry import load_policy

    config.validate()
    t0 = time.perf_counter()
    out = Path(config.out_dir)
    if out.exists() and not (out / "annotations.json").is_file():
        raise UserError(f"{out}: exists and is not an annotation folder; choose another out_dir")
    specs = [m.strip() for m in config.model.split(",") if m.strip()]
    if not specs:
        raise UserError("model: no policy named")
    policies = [load_policy(m) for m in specs]
    sizes = {int(p.latent_shape[-1]) for p in policies}
    if len(sizes) > 1:
        raise UserError(f"model: the policies {', '.join(specs)} draw different image sizes ({sorted(sizes)})")
    size = sizes.pop()
    records, test = draw_prompts(config)
    n, pool = len(records), config.samples_per_prompt
    total = 2 * n * pool
    sources = [_quantise(render(Scene.from_dict(r["source_scene"]), size)) if r["task"] == "edit" else None
               for r in records]
    images: list[_PoolImage] = []
    if config.n_model_samples > 0:
        for batch in _sample_pool(config, policies, records, sources):
            images += batch
            yield {"phase": "sample", "step": len(images), "total": total}
    images += _render_pool(config, records, size)
    images.sort(key=lambda im: (im.prompt, im.slot))
    t_pool = time.perf_counter()
    yield {"phase": "render", "step": len(images), "total": total}

    truths: list[Truth] = []
    for j, im in enumerate(images):
        rec = records[im.prompt]
        if rec["task"] == "edit":
            truths.append(judge_edit(_as_float(sources[im.prompt]), rec["prompt"], _as_float(im.pixels)))
        else:
            truths.append(judge_t2i(_as_float(im.pixels), rec["prompt"]))
        if (j + 1) % 64 == 0 or j + 1 == len(images):
            yield {"phase": "judge", "step": len(images) + j + 1, "total": total}
    t_judge = time.perf_counter()

    dd, stats = _build_splits(config, records, test, sources, images, truths)

    def summary() -> dict[str, Any]:  # after the save, so that it can time it
        t_write = time.perf_counter()
        by_origin: dict[str, list[Truth]] = {}
        for im, t in zip(images, truths, strict=True):
            by_origin.setdefault(im.origin, []).append(t)
        stats["pool"] = {
            "images": len(images), "image_size": size, "model": config.model,
            "models": {f"model {m}": spec for m, spec in enumerate(specs)} if len(specs) > 1 else {},
            "by_origin": {o: {"n": len(ts), "oracle": _r(np.mean([t.overall for t in ts])),
                              "valid": _r(np.mean([t.valid for t in ts]))}
                          for o, ts in sorted(by_origin.items())},
        }
        stats["seconds"] = {"pool": _r(t_pool - t0), "judge": _r(t_judge - t_pool),
                            "write": _r(t_write - t_judge), "total": _r(t_write - t0)}
        stats["config"] = asdict(config)
        return stats

    publish_annotations(dd, out, summary)
    yield {
        "done": True, "out": str(out), "images": len(images), **stats["counts"],
        "tie_rate": stats["pairwise"]["tie_rate"], "pairwise_agreement": stats["agreement"]["pairwise"],
        "likert_exact_agreement": stats["agreement"]["likert_exact"]["mean"],
        "spearman_noiseless": stats["agreement"]["spearman_vs_oracle"]["noiseless"]["sum"],
        "spearman_noisy": stats["agreement"]["spearman_vs_oracle"]["noisy"]["sum"],
        "seconds": stats["seconds"]["total"],
    }


def publish_annotations(dd: datasets.DatasetDict, out: Path, summary: Callable[[], dict[str, Any]]) -> None:
    """Save `dd` and `annotations.json` (`summary()`, called after the save) under a temporary name beside
    `out`, then rename it into place: an interrupted write leaves nothing half-written, and an existing
    `out` is replaced only by a complete dataset."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        was_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # the library never prints; the CLI renders progress
        try:
            dd.save_to_disk(str(tmp))
        finally:
            if was_enabled:
                datasets.enable_progress_bars()
        (tmp / "annotations.json").write_text(json.dumps(summary(), indent=1) + "\n", encoding="utf-8")
        publish_mode(tmp)  # mkdtemp makes it private; the finished dataset is not
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _build_splits(
    config: AnnotateConfig,
    records: list[dict[str, Any]],
    test: list[bool],
    sources: list[np.ndarray | None],
    images: list[_PoolImage],
    truths: list[Truth],
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Label the judged pool (pointwise Likert, pairwise preferences) into the four splits + statistics."""
    pngs = [_png(im.pixels) for im in images]
    src_png = [None if s is None else _png(s) for s in sources]
    cols: dict[str, dict[str, list[Any]]] = {
        name: {k: [] for k in feats} for name, feats in (
            ("pointwise", POINTWISE_FEATURES), ("pointwise_test", POINTWISE_FEATURES),
            ("pairwise", PAIRWISE_FEATURES), ("pairwise_test", PAIRWISE_FEATURES))
    }
    noisy_l: dict[str, list[int]] = {d: [] for d in LIKERT_DIMS}
    clean_l: dict[str, list[int]] = {d: [] for d in LIKERT_DIMS}
    for j, (im, t) in enumerate(zip(images, truths, strict=True)):
        rec = records[im.prompt]
        rng = np.random.default_rng([config.seed, im.prompt, im.slot, 2])
        labels = {d: noisy_likert(t.latent(d), rng, config.likert_noise, config.slip_rate)
                  for d in LIKERT_DIMS}
        for d in LIKERT_DIMS:
            noisy_l[d].append(labels[d])
            clean_l[d].append(likert(t.latent(d)))
        row = {"image": pngs[j], "prompt": rec["prompt"], "task": rec["task"], "category": rec["category"],
               "source_image": src_png[im.prompt], **labels, "oracle": t.overall, "reasons": list(t.reasons)}
        split = cols["pointwise_test" if test[im.prompt] else "pointwise"]
        for k, v in row.items():
            split[k].append(v)

    first = {}  # prompt -> index of its first pool image (images are sorted by prompt, then slot)
    for j, im in enumerate(images):
        first.setdefault(im.prompt, j)
    pair_clean: list[float] = []
    pair_noisy: list[float] = []
    reasons: list[str] = []
    flags: list[tuple[bool, bool]] = []
    for i, rec in enumerate(records):
        rng = np.random.default_rng([config.seed, i, 3])
        pool = config.samples_per_prompt
        all_pairs = list(combinations(range(pool), 2))
        for p in rng.permutation(len(all_pairs))[: config.pairs_per_prompt]:
            a, b = all_pairs[p]
            if rng.random() < 0.5:
                a, b = b, a
            flip = rng.random() < config.flip_rate
            ja, jb = first[i] + a, first[i] + b
            ta, tb = truths[ja], truths[jb]
            label, reason = prefer(ta, tb, config.tie_threshold)
            noisy = 1.0 - label if flip and label != 0.5 else label
            pair_clean.append(label)
            pair_noisy.append(noisy)
            reasons.append(reason)
            valid, distorted = ta.valid and tb.valid, ta.figure_distortion or tb.figure_distortion
            flags.append((valid, distorted))
            row = {"prompt": rec["prompt"], "task": rec["task"], "category": rec["category"],
                   "image_a": pngs[ja], "image_b": pngs[jb], "source_image": src_png[i], "label": noisy,
                   "reason": reason, "oracle_a": ta.overall, "oracle_b": tb.overall, "valid": valid,
                   "text_distortion": False, "figure_distortion": distorted}
            split = cols["pairwise_test" if test[i] else "pairwise"]
            for k, v in row.items():
                split[k].append(v)

    feats = {"pointwise": POINTWISE_FEATURES, "pointwise_test": POINTWISE_FEATURES,
             "pairwise": PAIRWISE_FEATURES, "pairwise_test": PAIRWISE_FEATURES}
    dd = datasets.DatasetDict(
        {name: datasets.Dataset.from_dict(c, features=feats[name]) for name, c in cols.items()})

    oracle = np.array([t.overall for t in truths])
    noisy_sum = np.sum([noisy_l[d] for d in LIKERT_DIMS], axis=0)
    clean_sum = np.sum([clean_l[d] for d in LIKERT_DIMS], axis=0)
    exact = {d: float(np.mean(np.equal(noisy_l[d], clean_l[d]))) for d in LIKERT_DIMS}
    within = {d: float(np.mean(np.abs(np.subtract(noisy_l[d], clean_l[d])) <= 1)) for d in LIKERT_DIMS}
    n_pairs = max(1, len(pair_noisy))
    stats: dict[str, Any] = {
        "counts": {
            "prompts": len(records), "test_prompts": int(sum(test)),
            **{name: len(c["prompt"]) for name, c in cols.items()},
        },
        "likert": {
            "cuts": list(LIKERT_CUTS),
            "histogram": {d: _hist(noisy_l[d], range(1, 6)) for d in LIKERT_DIMS},
            "histogram_noiseless": {d: _hist(clean_l[d], range(1, 6)) for d in LIKERT_DIMS},
        },
        "pairwise": {
            "label_histogram": _hist(pair_noisy, (1.0, 0.5, 0.0)),
            "reason_histogram": _hist(reasons, (*LEVELS, "tie")),
            "tie_rate": _r(float(np.mean(np.equal(pair_noisy, 0.5))) if pair_noisy else 0.0),
            "valid_rate": _r(sum(v for v, _ in flags) / n_pairs),
            "figure_distortion_rate": _r(sum(f for _, f in flags) / n_pairs),
            "text_distortion_rate": 0.0,
        },
        "noise": {"likert_noise": config.likert_noise, "slip_rate": config.slip_rate,
                  "flip_rate": config.flip_rate, "tie_threshold": config.tie_threshold},
        "agreement": {
            "likert_exact": {**{d: _r(v) for d, v in exact.items()},
                             "mean": _r(float(np.mean(list(exact.values()))))},
            "likert_within_one": {d: _r(v) for d, v in within.items()},
            "pairwise": _r(float(np.mean(np.equal(pair_noisy, pair_clean))) if pair_noisy else 1.0),
            "spearman_vs_oracle": {
                "noiseless": {**{d: _r(spearman(clean_l[d], oracle)) for d in LIKERT_DIMS},
                              "sum": _r(spearman(clean_sum, oracle))},
                "noisy": {**{d: _r(spearman(noisy_l[d], oracle)) for d in LIKERT_DIMS},
                          "sum": _r(spearman(noisy_sum, oracle))},
            },
        },
    }
    return dd, stats
