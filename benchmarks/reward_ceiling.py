"""How well can a reward model order one prompt's images? Two reference points for `qirl score eval`.

On the `pointwise_test` split of an annotation folder, every two images of one prompt whose oracle
scores differ form a pair (the `prompt_pair_accuracy` of `qirl score eval`, the order GRPO acts on):

- `labels`: the simulated annotators' own Likert labels (mean of quality, fidelity, alignment) as the
  score; label ties count one half. A reward model learns these labels, so this is roughly its ceiling
  (a model predicting the expected label can beat it a little by averaging annotator noise away).
- `cnn` (with `--cnn-steps N`): a small prompt-blind CNN, trained N steps to regress the three labels of
  `--train`'s `pointwise` split from the image alone, then scored the same way. It says what plain
  perception of these 32x32 images recovers from the same labels, with no prompt reading at all.
- `models` (with `--model PATH`, repeatable): a pointwise VLM reward model asked each question alone,
  its same-prompt pair accuracy per question, the same with every image given another prompt's text
  (each prompt's images read the next prompt's: does the order come from reading the prompt?), and the within-prompt
  share of its score variance, mean over prompts of Var(score | prompt) / Var(score), next to the
  oracle's (does it vary within a prompt at all, or only rank prompts?).

    python benchmarks/reward_ceiling.py --data runs/r15/ann1 --train runs/r15/ann0 --cnn-steps 3000
    python benchmarks/reward_ceiling.py --data runs/r15/ann1 --model runs/rm_P/model
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from torch import nn

from qirl.rewards.vlm.data import load_annotations
from qirl.rewards.vlm.train import pair_accuracy

DIMS = ("quality", "fidelity", "alignment")


def prompt_groups(prompts: list[str]) -> dict[str, list[int]]:
    """{prompt: its row indices}, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    return groups


def same_prompt_pairs(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    groups = prompt_groups(prompts)
    pairs = [(g[a], g[b]) for g in groups.values() for a in range(len(g)) for b in range(a + 1, len(g))]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def images_and_labels(split) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    x = np.stack([np.asarray(im.convert("RGB")) for im in split["image"]])  # [N, H, W, 3] uint8
    y = np.array([split[d] for d in DIMS], dtype=np.float32).T  # [N, 3]
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(y)


def within_prompt_share(score: torch.Tensor, prompts: list[str]) -> float:
    """Mean over prompts of the score's variance within the prompt, over its variance in all rows."""
    within = np.mean([score[g].var(unbiased=False).item() for g in prompt_groups(prompts).values()])
    return float(within / score.var(unbiased=False).item())


def question_report(path: str, split, ia: torch.Tensor, ib: torch.Tensor, oracle: torch.Tensor) -> dict:  # noqa: ANN001
    """Per question: same-prompt pair accuracy (own prompt, another prompt's text) and within-prompt share."""
    from qirl.rewards.vlm.data import image_row
    from qirl.rewards.vlm.model import VLMReward

    rm = VLMReward.load(path)
    rows = [split[i] for i in range(len(split))]
    images = [image_row(r, "image", "pointwise_test") for r in rows]
    prompts, tasks = [r["prompt"] for r in rows], [r["task"] for r in rows]
    distinct = list(prompt_groups(prompts))
    other = dict(zip(distinct, distinct[1:] + distinct[:1], strict=True))  # each prompt -> the next one's text
    shifted = [other[p] for p in prompts]
    out = {}
    for dim in DIMS:
        rm.config.dimension = dim
        s = rm.reward_rows(images, prompts, tasks).double()  # [N]
        s_other = rm.reward_rows(images, shifted, tasks).double()  # [N] same images, another prompt's text
        out[dim] = {
            "same_prompt": pair_accuracy(s[ia], s[ib], oracle[ia], oracle[ib], 1e-6)[0],
            "same_prompt_other_text": pair_accuracy(s_other[ia], s_other[ib], oracle[ia], oracle[ib], 1e-6)[0],
            "within_share": within_prompt_share(s, prompts),
        }
    return out


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.GELU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.Conv2d(64, 128, 3, padding=1, stride=2), nn.GELU(),
        nn.Conv2d(128, 128, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 3),
    )


def _rounded(v):  # noqa: ANN001, ANN202
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 3) if isinstance(v, float) else v


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="annotation folder scored (its pointwise_test split)")
    ap.add_argument("--train", default="", help="annotation folder the CNN learns from (its pointwise split)")
    ap.add_argument("--cnn-steps", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", action="append", default=[], help="a pointwise VLM reward model folder")
    args = ap.parse_args(argv)

    test = load_annotations(args.data)["pointwise_test"]
    oracle = torch.tensor(test["oracle"], dtype=torch.float64)
    ia, ib = same_prompt_pairs(test["prompt"])
    x_test, y_test = images_and_labels(test)
    labels = y_test.double().mean(1)
    out = {"data": args.data, "pairs": int(len(ia))}
    out["labels"], _ = pair_accuracy(labels[ia], labels[ib], oracle[ia], oracle[ib], 1e-6)
    out["oracle_within_share"] = within_prompt_share(oracle, test["prompt"])
    if args.cnn_steps:
        torch.manual_seed(args.seed)
        x, y = images_and_labels(load_annotations(args.train or args.data)["pointwise"])
        net = cnn()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        for _ in range(args.cnn_steps):
            i = torch.randint(len(x), (64,))
            loss = ((net(x[i]) - y[i]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            s = net(x_test).mean(1).double()  # [N] mean of the three predicted labels
        out["cnn"], _ = pair_accuracy(s[ia], s[ib], oracle[ia], oracle[ib], 1e-6)
        out["cnn_steps"] = args.cnn_steps
    if args.model:
        out["models"] = {path: question_report(path, test, ia, ib, oracle) for path in args.model}
    print(json.dumps(_rounded(out), indent=1))
    return out


if __name__ == "__main__":
    main()
