"""How much do one GRPO group's edits differ? The exploration an edit GRPO recipe has to work with.

For the first `--prompts` training edits, draw a group of `--group` SDE rollouts each, as
`qirl grpo` does (`sample_sde` with the recipe's guidance, noise level and SDE window; one shared
initial noise per group unless `--independent-noise`), score them with the edit oracle
(`qirl.shapes.score_edit_batch`) and report, averaged over groups: the oracle's edit overall, the
within-group standard deviation of success and of overall (0-100), and the fraction of groups whose
success is not the same for every rollout (a group where every rollout scores the same gives GRPO no
signal on it). A GRPO recipe cannot climb on groups that all succeed or all fail.

    python benchmarks/edit_group_spread.py                                    # the recipe's settings
    python benchmarks/edit_group_spread.py --independent-noise
    python benchmarks/edit_group_spread.py --noise-level 1.0 --window 6

Where is an edit's outcome decided? `--per-step` repeats the measurement with a single SDE step at each
step k of the sampler in turn (all other steps ODE, one shared initial noise per group), so a group's
rollouts differ only by the noise injected at step k. A step whose noise often flips the edit's
success is one where the outcome is still open; GRPO's trained window should cover those steps,
because a window step that cannot change the outcome gets advantages uncorrelated with its actions.

    python benchmarks/edit_group_spread.py --per-step --prompts 16 --group 6
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from qirl.data import PromptRecord
from qirl.models.policy import FlowPolicy
from qirl.models.registry import load_policy
from qirl.prompt_sets import image_noise, record_source, resolve_prompts
from qirl.sampling import sample_sde
from qirl.shapes import score_edit_batch


def group_spread(success: np.ndarray, overall: np.ndarray) -> dict[str, float]:
    """success, overall [P, G] (0-100) -> the group statistics of the module docstring."""
    return {
        "overall": float(overall.mean()),
        "success_sd": float(success.std(1).mean()),
        "overall_sd": float(overall.std(1).mean()),
        "groups_with_success_spread": float((success.std(1) > 0).mean()),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--pool", default="shapes-edit:64", help="prompt set the edits are drawn from")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--noise-level", type=float, default=0.7)
    ap.add_argument("--window", type=int, default=4, help="number of SDE steps")
    ap.add_argument("--window-start", type=int, default=0, help="first SDE step (0 = the noisiest)")
    ap.add_argument("--per-step", action="store_true", help="one SDE step at each step in turn (docstring)")
    ap.add_argument("--independent-noise", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    policy = load_policy(args.model)
    records = [r for r in resolve_prompts(args.pool) if r.task == "edit"][: args.prompts]
    if args.per_step:
        rows = []
        for k in range(args.steps):
            stats = spread(policy, records, args, window=[k], independent=False)
            rows.append({"sde_step": k} | {n: round(v, 3) for n, v in stats.items()})
            print(json.dumps(rows[-1]), flush=True)
        return {"settings": vars(args), "per_step": rows}
    window = list(range(args.window_start, args.window_start + args.window))
    out = vars(args) | spread(policy, records, args, window, args.independent_noise)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=1))
    return out


def spread(policy: FlowPolicy, records: list[PromptRecord], args: argparse.Namespace, window: list[int], independent: bool) -> dict[str, float]:
    """`group_spread` of `args.group` rollouts per edit, with SDE noise at the steps `window` only."""
    shape, G = tuple(policy.latent_shape), args.group
    gen = torch.Generator().manual_seed(args.seed)  # the SDE step noises
    success, overall = [], []
    for start in range(0, len(records), 8):
        chunk = records[start : start + 8]
        prompts = [r.prompt for r in chunk for _ in range(G)]
        sources = [record_source(r, policy.image_size) for r in chunk for _ in range(G)]
        rows = range(len(prompts))
        noise = torch.stack([
            image_noise(args.seed, (start + i // G) * G + (i % G if independent else 0), shape)
            for i in rows
        ])  # [b, C, h, w]
        with torch.no_grad():
            cond = policy.encode(prompts, sources)
            latents = sample_sde(policy, cond, num_steps=args.steps, guidance=args.guidance,
                                 noise_level=args.noise_level, sde_window=window,
                                 noise=noise, generator=gen, cond_logprobs=False).latents  # [b, C, h, w]
            images = policy.decode(latents).float().clamp(0, 1)  # [b, 3, H, W]
        scores = score_edit_batch(torch.stack(sources), prompts, images)
        success.append(np.array([s.success for s in scores]).reshape(-1, G))
        overall.append(np.array([s.overall for s in scores]).reshape(-1, G))
    return group_spread(np.concatenate(success), np.concatenate(overall))


if __name__ == "__main__":
    main()
