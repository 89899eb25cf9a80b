"""How much do a GRPO group's rewards differ? The within-group spread the advantage normalises.

For each model: ``--prompts`` prompts of a pool, G SDE rollouts each with a recipe's sampling (shared
initial noise, SDE window, noise level, hybrid CFG), scored by the oracle; prints the mean reward, the mean
within-group standard deviation and how many groups are (nearly) constant. A group whose rewards do not
differ gives GRPO no signal (DanceGRPO's and the report's reason to share the initial noise and curate).

    python benchmarks/group_spread.py --model /tmp/old/qirl/assets/base --model base
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from qirl.config import load_recipe
from qirl.models.registry import load_policy
from qirl.prompt_sets import resolve_prompts
from qirl.rewards.base import RewardRecord
from qirl.rewards.composite import CompositeReward
from qirl.rl.grpo import GrpoRecipe, window_at
from qirl.sampling import sample_sde


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--recipe", default="t2i")
    ap.add_argument("--prompts", default="shapes-t2i:16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    recipe = load_recipe(GrpoRecipe, args.recipe)
    s, g = recipe.sampling, recipe.train.group_size
    composite = CompositeReward.from_config(recipe.rewards)
    records = resolve_prompts(args.prompts)
    out = {}
    for spec in args.model:
        policy = load_policy(spec)
        stds, means = [], []
        for i, r in enumerate(records):
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            with torch.no_grad():
                cond = policy.encode([r.prompt]).repeat_interleave(g)
                noise = torch.randn((1, *policy.latent_shape), generator=gen).repeat(g, 1, 1, 1)  # shared
                ro = sample_sde(policy, cond, s.num_steps, guidance=s.guidance, shift=s.shift,
                                noise_level=s.noise_level, cfg_mode=s.cfg_mode, sde_window=window_at(0, s),
                                generator=gen, noise=noise, cond_logprobs=False)
                images = policy.decode(ro.latents)  # [G, 3, H, W]
            rec = [RewardRecord(task=r.task, category=r.category)] * g
            rewards = composite.combined(composite.score_all(images, [r.prompt] * g, rec), [r.category] * g)
            stds.append(float(rewards.std(unbiased=False)))
            means.append(float(rewards.mean()))
        out[spec] = {"mean_reward": round(float(np.mean(means)), 4),
                     "mean_within_group_std": round(float(np.mean(stds)), 4),
                     "groups_with_std_below_0.01": int(np.sum(np.array(stds) < 0.01)), "groups": len(stds)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
