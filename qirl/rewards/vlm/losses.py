"""Reward-model losses: the pointwise score loss (with CoT's LM term) and Bradley-Terry with ties.

Pointwise (the report's adopted paradigm: the VLM outputs a distribution over the Likert scores and the
reward is its expectation). With z the logits of the tokens "1".."5" at the score position,
p = softmax(z), E = sum_k k p_k and y the Likert label,

    L_point = CE(z, y) + lambda_reg * ((E - y) / 4)^2

Cross-entropy trains the distribution (it is the LM's own objective, so a pretrained VLM starts close);
it is blind to order, though: putting mass on 1 when the label is 5 costs the same as putting it on 4.
The regression term on the expectation, which is exactly the reward RL consumes, adds that ordinal
distance. It is measured on the reward's [0, 1] scale, so lambda_reg = 1 (the default) keeps it a
correction: at most 1, and under 0.06 once E is within one point of y, against a CE of about 1.6 at
start. With chain of thought the target is "<reasoning> Score: k" under teacher forcing, and the
mean token cross-entropy of the reasoning and marker tokens is added with weight lambda_lm.

Within-prompt ranking (optional, `train.rank_weight`; RankNet, Burges et al. 2005, as ImageReward trains
on its per-prompt rankings). A GRPO reward only has to order the images of one prompt's group, and the
pointwise loss spends most of its gradient on what separates prompts (a three-object scene rates lower
than a one-object one). When a batch holds several images of each prompt, all asked the same dimension,
every two of them with different labels y_i > y_j add

    L_rank = -log sigmoid(s (E_i - E_j)),   s = 2 per Likert point

averaged over such pairs. It uses the same pointwise labels (no new annotation) and the reward is still
the expectation E; the term only points the gradient at the within-group differences.

Pairwise (Bradley-Terry 1952, as in the report's pairwise baseline): with r_a, r_b the scalar head's
outputs, d = r_a - r_b and the label l = 1 (a preferred), 0 (b preferred) or 0.5 (tie),

    L_BT = -[ l log sigmoid(d) + (1 - l) log sigmoid(-d) ]

which is -log sigmoid(d) for a preference and the symmetric -0.5 [log sigmoid(d) + log sigmoid(-d)] for a
tie (minimal at d = 0: a tie pulls the two rewards together). We use this soft-label form rather than
Rao-Kupper or Davidson: those add a tie parameter to fit, which only matters when tie rates must be
predicted, and a reward model is only ever asked to rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SCORE_VALUES = torch.arange(1, 6, dtype=torch.float32)  # the Likert values of the tokens "1".."5"


def expected_score(logits5: Tensor) -> Tensor:
    """[..., 5] score-token logits -> [...] expectation E in [1, 5] (computed in float32)."""
    return expectation(torch.softmax(logits5.float(), dim=-1))


def expectation(probs: Tensor) -> Tensor:
    """[..., 5] probabilities of "1".."5" -> [...] E = sum_k k p_k."""
    return (probs.float() * SCORE_VALUES.to(probs.device)).sum(-1)


def normalised_reward(expectation: Tensor) -> Tensor:
    """E in [1, 5] -> (E - 1) / 4 in [0, 1]."""
    return (expectation - 1.0) / 4.0


def pointwise_loss(
    logits5: Tensor, labels: Tensor, regression_weight: float = 1.0
) -> tuple[Tensor, dict[str, Tensor]]:
    """logits5 [B, 5], labels [B] ints in 1..5 -> (loss, {"ce", "reg"}) as in the module docstring."""
    logits5 = logits5.float()
    labels = labels.to(logits5.device)
    ce = F.cross_entropy(logits5, labels.long() - 1)
    reg = (((expected_score(logits5) - labels.float()) / 4.0) ** 2).mean()
    return ce + regression_weight * reg, {"ce": ce.detach(), "reg": reg.detach()}


RANK_SCALE = 2.0  # s in L_rank: a one-point expectation gap gives sigmoid(2) = 0.88


def within_group_rank_loss(expectations: Tensor, labels: Tensor, groups: Tensor) -> Tensor | None:
    """L_rank of the module docstring. expectations [B] (E in [1, 5]), labels [B] Likert ints, groups [B]
    ids (same id = same prompt and dimension). None when no two images of a group differ in label."""
    e, y, g = expectations.float(), labels.to(expectations.device).float(), groups.to(expectations.device)
    same = g[:, None] == g[None, :]  # [B, B]
    better = same & (y[:, None] > y[None, :])  # [B, B] pair (i, j) with y_i > y_j
    if not better.any():
        return None
    d = e[:, None] - e[None, :]  # [B, B] E_i - E_j
    return -F.logsigmoid(RANK_SCALE * d[better]).mean()


def bradley_terry_loss(r_a: Tensor, r_b: Tensor, label: Tensor) -> Tensor:
    """Mean soft-label Bradley-Terry loss; label 1 = a preferred, 0 = b preferred, 0.5 = tie."""
    d = r_a.float() - r_b.float()
    label = label.to(d.device).float()
    return -(label * F.logsigmoid(d) + (1.0 - label) * F.logsigmoid(-d)).mean()


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean token cross-entropy; logits [N, V], targets [N] (N = 0 gives 0)."""
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)
