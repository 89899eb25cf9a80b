"""Prompt curation (`qirl curate prompts.jsonl`): keep the prompts GRPO can learn from, calibrate weights.

GRPO's advantage is normalised within each prompt's group of G rollouts (DESIGN.md, data flow step 4):

    A(x_0^i, c) = sum_k w_k(c) (R_k(x_0^i, c) - mu_k) / sigma_k

so a prompt whose G rewards are (nearly) equal gives no learning signal, only noise. Curation measures
that directly, with the rollouts GRPO itself would draw:

1. Sampling: G images per prompt with `sample_sde` (cfg_mode "hybrid": guided SDE rollout, the same
   noise level, steps, guidance and shift as a GRPO recipe), fixed seeds (initial noise of image
   p*G + g is `image_noise(seed, p*G + g)`; the SDE noises come from a generator seeded with
   `seed` and the batch's first prompt index, so a run is reproducible for a given `batch_prompts`).
   The rollout is GRPO's own (`qirl.rl.rollout`); each image is scored by the composite on a
   `RewardService`, overlapping the next batch: rewards R [P, G, K] (NaN where a model cannot score), and
   the composite r = `CompositeReward.combined` (weighted mean of the valid rewards) [P, G].
2. Per prompt and per reward (and composite), over the valid values of the group: mean, population
   std, range = max - min (NaN with fewer than 2 valid values, which never reaches a threshold).
   A prompt is kept when range >= `filter.threshold` for `filter.metric`: "composite", one reward's name,
   or "any" (some reward's range reaches the threshold).
3. The kept records (each with a `curation` field: per-reward and composite range and mean) are
   written to `out.prompts` atomically. An empty result is a `UserError` and nothing is written.
4. Calibration (`calibration.rule = "equal_share"`), per category c over its groups (the kept ones,
   or all with `calibration.target = "all"`). After per-group normalisation, reward k's term
   (R_k - mu_k)/sigma_k has variance 1 in a group where R_k varies and 0 where it does not
   (`group_advantage` gives 0 for a constant group), so reward k's share of the category's advantage
   variance is w_k^2 p_k(c), where

       p_k(c) = #{groups of c with range_k > eps} / #{groups of c where reward k is defined (>= 2 valid)}.

   Equalising those shares up to the recipe's base weights b_k (w_k^2 p_k proportional to b_k^2) gives

       w_k(c) = b_k / sqrt(p_k(c)),   then rescaled so that the weights of category c average 1,

   over the rewards defined in c with p_k(c) > 0; a reward that is defined in c but never varies
   (p_k = 0) carries no signal there and gets weight 0; a reward never defined in c is left out of c's
   table (it keeps its default weight, which the advantage ignores as its values are NaN).
   `calibration.rule = "equal_spread"` is the same idea for GRPO's ``advantage: combined`` (normalise
   the weighted mean of the rewards once per group): there reward k's share of the variance of the
   combined reward in a group is w_k^2 sigma_k^2 (covariances aside), so equal shares need

       w_k(c) = b_k / s_k(c),   s_k(c) = sqrt(mean over c's groups of sigma_k^2)   (then mean 1 per c),

   and a reward whose within-group std is (almost) always 0 gets 0.
   `calibration.rule = "none"` writes the base weights unchanged for every category.
   The result goes to `out.weights` as `category_weights: {category: {reward: weight}}`, the shape of
   `CompositeConfig.category_weights`, so a GRPO recipe's `rewards:` section can merge it; `out.stats`
   gets every number above as JSON.

The run is a generator of progress dicts ending with `{"done": True, ...}`; it never prints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from qirl.data import PromptRecord, atomic_write_text, write_jsonl
from qirl.errors import UserError
from qirl.models.policy import FlowPolicy
from qirl.models.registry import PolicyOptions, load_policy
from qirl.prompt_sets import image_noise, record_source, resolve_prompts
from qirl.rewards.base import RewardRecord
from qirl.rewards.composite import CompositeConfig, CompositeReward, RewardSpec
from qirl.rewards.service import RewardService
from qirl.rl.rollout import GroupRollout, SdeSpec, encode_groups, roll_out_groups

COMPOSITE = "composite"
RULES = ("equal_share", "equal_spread", "none")
RULE_FORMULAS = {
    "equal_share": "w_k(c) = b_k / sqrt(p_k(c)), mean 1 per category",
    "equal_spread": "w_k(c) = b_k / s_k(c), s_k(c) = RMS within-group std, mean 1 per category",
    "none": "w_k(c) = b_k",
}
TARGETS = ("kept", "all")


def _default_rewards() -> CompositeConfig:
    return CompositeConfig(
        models=[
            RewardSpec("oracle_alignment"),
            RewardSpec("oracle_fidelity"),
            RewardSpec("oracle_aesthetics"),
        ]
    )


@dataclass
class CurateSampling:
    group_size: int = 8  # G rollouts per prompt
    num_steps: int = 10
    guidance: float = 3.0
    shift: float = 1.0
    noise_level: float = 0.7  # SDE noise of the GRPO rollout (sample_sde, cfg_mode "hybrid")
    window_start: int = 0  # SDE steps window_start .. window_start + window_size - 1, as the GRPO recipe
    window_size: int = 4  # (0: SDE on every step)
    shared_noise: bool = True  # a group shares its initial noise, as GRPO's default
    batch_prompts: int = 8  # prompts per sampling batch (batch_prompts * G images)
    reward_workers: int = 2  # RewardService threads: a batch is scored while the next rolls out


@dataclass
class CurateFilter:
    threshold: float = 0.1  # keep a prompt when its intra-group range (max - min) >= threshold
    metric: str = COMPOSITE  # "composite" | a reward name | "any" (not `on`: YAML 1.1 reads a bare on: as true)


@dataclass
class CurateCalibration:
    rule: str = "equal_share"  # equal_share: b_k / sqrt(p_k(c)) | equal_spread: b_k / s_k(c) | none (mean 1 per c)
    target: str = "kept"  # groups counted for p_k(c): kept | all
    eps: float = 1e-6  # a group "varies" in reward k when its range > eps


@dataclass
class CurateOut:
    prompts: str = "runs/curate/curated.jsonl"
    weights: str = "runs/curate/weights.yaml"
    stats: str = "runs/curate/stats.json"


@dataclass
class CurateRecipe:
    model: str = "base"
    policy: PolicyOptions = field(default_factory=PolicyOptions)  # device, dtype, resolution, ...
    prompts: str = "demo"  # JSONL path or built-in set name
    rewards: CompositeConfig = field(default_factory=_default_rewards)
    sampling: CurateSampling = field(default_factory=CurateSampling)
    filter: CurateFilter = field(default_factory=CurateFilter)
    calibration: CurateCalibration = field(default_factory=CurateCalibration)
    out: CurateOut = field(default_factory=CurateOut)
    seed: int = 0


def _nan_float(x: float) -> float | None:
    """JSON-safe float (NaN -> None)."""
    return None if x is None or math.isnan(x) else float(x)


def group_stats(values: np.ndarray) -> dict[str, np.ndarray]:
    """values [P, G] (NaN = not scored) -> mean, std (population), range (max - min), valid count, each [P].

    Statistics use the valid values only; mean/std are NaN with no valid value, range with fewer than 2.
    """
    valid = ~np.isnan(values)  # [P, G]
    n = valid.sum(axis=1)  # [P]
    filled = np.where(valid, values, 0.0)
    mean = np.where(n > 0, filled.sum(axis=1) / np.maximum(n, 1), np.nan)  # [P]
    var = np.where(valid, (values - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(n, 1)
    std = np.where(n > 0, np.sqrt(var), np.nan)
    hi = np.where(valid, values, -np.inf).max(axis=1)
    lo = np.where(valid, values, np.inf).min(axis=1)
    rng = np.where(n >= 2, hi - lo, np.nan)
    return {"mean": mean, "std": std, "range": rng, "valid": n}


def keep_mask(ranges: dict[str, np.ndarray], threshold: float, on: str) -> np.ndarray:
    """bool [P]: range >= threshold for `on` (a key of `ranges`) or, for "any", for some reward."""
    with np.errstate(invalid="ignore"):
        if on == "any":
            cols = [r >= threshold for name, r in ranges.items() if name != COMPOSITE]
            return np.any(np.stack(cols), axis=0)
        return ranges[on] >= threshold


def calibrate(
    rewards: np.ndarray,
    categories: Sequence[str],
    names: Sequence[str],
    base_weights: Sequence[float] | None = None,
    eps: float = 1e-6,
    rule: str = "equal_share",
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float | None]]]:
    """rewards [P, G, K] of the groups to calibrate on -> (category_weights, p) (see the module docstring).

    p[c][k] = fraction of category c's groups (where reward k has >= 2 valid values) with range_k > eps;
    w_k(c) = b_k / sqrt(p[c][k]) rescaled to average 1 over the rewards defined in c (0 when p = 0).
    Rule "none": w_k(c) = b_k for every reward defined in c.
    """
    if rule not in RULES:
        raise UserError(f"calibration.rule {rule!r} is not one of {', '.join(RULES)}")
    base = np.ones(len(names)) if base_weights is None else np.asarray(base_weights, dtype=np.float64)
    weights: dict[str, dict[str, float]] = {}
    fractions: dict[str, dict[str, float | None]] = {}
    cats = np.asarray(list(categories), dtype=object)
    for cat in sorted(set(categories)):
        sub = rewards[cats == cat]  # [Pc, G, K]
        table: dict[str, float] = {}
        fractions[cat] = {}
        raw: dict[str, float] = {}
        for k, name in enumerate(names):
            rng = group_stats(sub[:, :, k])["range"]  # [Pc]
            defined = ~np.isnan(rng)
            if not defined.any():
                fractions[cat][name] = None
                continue
            p = float((rng[defined] > eps).mean())
            fractions[cat][name] = p
            if rule == "none":
                raw[name] = float(base[k])
            elif rule == "equal_spread":
                std = group_stats(sub[:, :, k])["std"][defined]  # [Pc'] within-group population std
                spread = float(np.sqrt(np.mean(std**2)))
                raw[name] = float(base[k]) / spread if spread > eps else 0.0
            else:
                raw[name] = float(base[k]) / math.sqrt(p) if p > 0 else 0.0
        if not raw:
            continue
        if rule == "none":
            table = raw
        else:
            mean = sum(raw.values()) / len(raw)
            table = {n: (w / mean if mean > 0 else 0.0) for n, w in raw.items()}
        weights[cat] = {n: round(w, 6) for n, w in table.items()}
    return weights, fractions


def _validate(recipe: CurateRecipe, names: Sequence[str]) -> None:
    s = recipe.sampling
    if s.group_size < 2:
        raise UserError(
            f"sampling.group_size must be at least 2 (a range needs 2 samples), got {s.group_size}"
        )
    if s.num_steps < 1 or s.batch_prompts < 1 or s.reward_workers < 1:
        raise UserError("sampling.num_steps, sampling.batch_prompts and sampling.reward_workers must be at least 1")
    if s.window_size < 0 or s.window_start < 0 or s.window_start + s.window_size > s.num_steps:
        raise UserError(
            f"sampling window {s.window_start}..{s.window_start + s.window_size - 1} is out of range: "
            f"steps are 0..{s.num_steps - 1} for num_steps={s.num_steps}"
        )
    if s.noise_level < 0:
        raise UserError(f"sampling.noise_level must be >= 0, got {s.noise_level}")
    on = recipe.filter.metric
    if on not in (COMPOSITE, "any", *names):
        raise UserError(
            f"filter.metric {on!r}: expected 'composite', 'any' or a reward name ({', '.join(names)})"
        )
    if recipe.calibration.rule not in RULES:
        raise UserError(f"calibration.rule {recipe.calibration.rule!r} is not one of {', '.join(RULES)}")
    if recipe.calibration.target not in TARGETS:
        raise UserError(
            f"calibration.target {recipe.calibration.target!r} is not one of {', '.join(TARGETS)}"
        )


def _score_groups(
    recipe: CurateRecipe, policy: FlowPolicy, composite: CompositeReward, records: list[PromptRecord]
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (prompts done, rewards [b, G, K]) batch by batch. Rollouts go through GRPO's group rollout
    (`qirl.rl.rollout`); a batch is scored on the `RewardService` while the next one rolls out."""
    s = recipe.sampling
    g = s.group_size
    size = policy.image_size
    sources = [record_source(r, size) for r in records]  # validate every source before any work
    shape = tuple(policy.latent_shape)
    window = list(range(s.window_start, s.window_start + s.window_size)) if s.window_size else None
    spec = SdeSpec(s.num_steps, s.guidance, s.shift, s.noise_level, "hybrid", window)
    service = RewardService(dict(zip(composite.names, composite.rewards, strict=True)), workers=s.reward_workers)
    pending: list[tuple[list[int], GroupRollout]] = []

    def scored() -> tuple[int, np.ndarray]:
        idx, group = pending.pop(0)
        rewards, _ = group.rewards()  # [b*G, K]
        return idx[-1] + 1, rewards.numpy().astype(np.float64).reshape(len(idx), g, len(composite))

    try:
        for start in range(0, len(records), s.batch_prompts):
            idx = list(range(start, min(start + s.batch_prompts, len(records))))
            rows = [i for i in idx for _ in range(g)]  # prompt index of each image
            if s.shared_noise:  # the spread within a group then comes from the SDE steps only, as in GRPO
                noise = torch.stack([image_noise(recipe.seed, i * g, shape) for i in idx for _ in range(g)])
            else:
                noise = torch.stack([image_noise(recipe.seed, i * g + j, shape) for i in idx for j in range(g)])
            gen = torch.Generator(device=policy.device).manual_seed(recipe.seed * 1_000_003 + start)
            with torch.no_grad():
                cond = encode_groups(policy, [records[i].prompt for i in idx], [sources[i] for i in idx], g)
                group = roll_out_groups(
                    policy, cond, noise.to(policy.device), [(0, len(rows))], spec, service,
                    [records[i].prompt for i in rows],
                    [RewardRecord(task=records[i].task, category=records[i].category, source=sources[i]) for i in rows],
                    generator=gen, cond_logprobs=False,  # only the images are scored
                )
            pending.append((idx, group))
            if len(pending) > 1:
                yield scored()
        while pending:
            yield scored()
    finally:
        service.close(wait=True)


def curate(recipe: CurateRecipe, policy: FlowPolicy | None = None) -> Iterator[dict[str, Any]]:
    """Sample, score, filter and calibrate (module docstring); yields progress, then the summary.

    `policy` overrides `recipe.model` (tests, callers that already hold one).
    """
    records = resolve_prompts(recipe.prompts)
    if not records:
        raise UserError(f"{recipe.prompts}: no prompts")
    composite = CompositeReward.from_config(recipe.rewards)
    names = list(composite.names)
    _validate(recipe, names)
    if policy is None:
        policy = load_policy(recipe.model, options=recipe.policy)
    total = len(records)
    parts: list[np.ndarray] = []
    for done, batch in _score_groups(recipe, policy, composite, records):
        parts.append(batch)
        yield {"step": done, "total": total}
    rewards = np.concatenate(parts)  # [P, G, K]
    categories = [r.category for r in records]
    p, g, k = rewards.shape
    flat_cats = [c for c in categories for _ in range(g)]
    comp = composite.combined(torch.from_numpy(rewards.reshape(p * g, k)).float(), flat_cats)
    comp = comp.double().numpy().reshape(p, g)  # [P, G]

    stats = {name: group_stats(rewards[:, :, j]) for j, name in enumerate(names)}
    stats[COMPOSITE] = group_stats(comp)
    ranges = {name: st["range"] for name, st in stats.items()}
    thr, on = recipe.filter.threshold, recipe.filter.metric
    kept = keep_mask(ranges, thr, on)  # [P]
    n_kept = int(kept.sum())

    per_prompt = []
    for i, rec in enumerate(records):
        row = {
            "id": rec.id,
            "prompt": rec.prompt,
            "category": rec.category,
            "task": rec.task,
            "kept": bool(kept[i]),
            "rewards": {
                name: {key: _nan_float(float(st[key][i])) for key in ("mean", "std", "range")}
                for name, st in stats.items()
            },
        }
        per_prompt.append(row)
    per_category = {}
    for cat in sorted(set(categories)):
        m = np.array([c == cat for c in categories])
        per_category[cat] = {
            "prompts": int(m.sum()),
            "kept": int((kept & m).sum()),
            "kept_fraction": float((kept & m).mean() / m.mean()),
        }
    with np.errstate(invalid="ignore"):
        per_reward = {name: float(np.mean(r >= thr)) for name, r in ranges.items()}  # share reaching thr

    if n_kept == 0:
        raise UserError(f"no prompt reaches range >= {thr} on {on!r} (of {total}); lower filter.threshold")

    c = recipe.calibration
    sel = kept if c.target == "kept" else np.ones(p, dtype=bool)
    weights, fractions = calibrate(
        rewards[sel],
        [cat for cat, s in zip(categories, sel, strict=True) if s],
        names,
        [spec.weight for spec in recipe.rewards.models],
        eps=c.eps,
        rule=c.rule,
    )

    curated = []
    for i, rec in enumerate(records):
        if not kept[i]:
            continue
        info = {
            name: {
                "range": per_prompt[i]["rewards"][name]["range"],
                "mean": per_prompt[i]["rewards"][name]["mean"],
            }
            for name in stats
        }
        curated.append({**rec.to_json(), "curation": info})
    summary_stats = {
        "prompts": total,
        "kept": n_kept,
        "kept_fraction": n_kept / total,
        "filter": asdict(recipe.filter),
        "calibration": asdict(recipe.calibration),
        "sampling": asdict(recipe.sampling),
        "model": recipe.model,
        "seed": recipe.seed,
        "rewards": names,
        "per_category": per_category,
        "per_reward_reaching_threshold": per_reward,
        "signal_fraction": fractions,  # p_k(c)
        "category_weights": weights,
        "per_prompt": per_prompt,
    }
    header = (
        f"# qirl curate: per-category reward weights ({c.rule}: {RULE_FORMULAS[c.rule]})\n"
        "# merge into a GRPO recipe's `rewards:` section\n"
    )
    # every output is built before the first write; each write is atomic
    out = recipe.out
    write_jsonl(out.prompts, curated)
    atomic_write_text(out.weights, header + yaml.safe_dump({"category_weights": weights}, sort_keys=True))
    atomic_write_text(out.stats, json.dumps(summary_stats, indent=2) + "\n")
    yield {
        "done": True,
        "prompts": total,
        "kept": n_kept,
        "kept_fraction": n_kept / total,
        "per_category": per_category,
        "per_reward": per_reward,
        "category_weights": weights,
        "per_prompt": per_prompt,
        "out": {
            "prompts": str(Path(out.prompts)),
            "weights": str(Path(out.weights)),
            "stats": str(Path(out.stats)),
        },
    }
