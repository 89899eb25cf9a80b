"""The GPU benchmark script runs end to end on its tiny CPU config (so it cannot rot between GPU runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_qwen_image_grpo.py"


def test_qwen_image_grpo_benchmark_smoke_run() -> None:
    spec = importlib.util.spec_from_file_location("bench_qwen_image_grpo", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--tiny"])
    assert result["lora_rank"] == 4 and result["batch"] == 4
    assert result["step_s"] > 0 and result["images_per_s"] > 0
    assert result["model_flops_per_step"] > 0 and result["mfu"] is None  # counted FLOPs; no peak on a CPU


def test_word_sensitivity_is_zero_for_a_word_the_model_ignores() -> None:
    """`shape_confusion.py --sensitivity`: the base model's x0_hat and text states move with both words;
    the same model with its text zeroed out (so no word reaches the DiT) moves by exactly 0."""
    import dataclasses

    import torch

    from qirl.models.registry import load_policy

    spec = importlib.util.spec_from_file_location("shape_confusion", BENCH.parent / "shape_confusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    policy = load_policy("base")
    seen = module.word_sensitivity(policy, noises=2)
    assert all(v > 0 for by_t in seen.values() for v in by_t.values()), seen

    class Deaf(torch.nn.Module):
        """The base model, but every prompt reaches it as zeros."""

        def __init__(self) -> None:
            super().__init__()
            self.inner = policy
            self.latent_shape = policy.latent_shape
            self.encode_images = policy.encode_images

        def encode(self, prompts, sources):  # noqa: ANN001, ANN202
            cond = policy.encode(prompts, sources)
            return dataclasses.replace(cond, text=torch.zeros_like(cond.text), pooled=torch.zeros_like(cond.pooled))

        def velocity(self, x, t, cond):  # noqa: ANN001, ANN202
            return policy.velocity(x, t, cond)

    deaf = module.word_sensitivity(Deaf(), noises=2)
    assert all(v == 0 for by_t in deaf.values() for v in by_t.values()), deaf
    # --loss-gap: a wrong colour word costs the base model loss at every t; a deaf model pays nothing.
    gap = module.loss_gap(policy, n=8, noises=1)
    assert all(row["wrong colour"] > 0 and row["loss"] > 0 for row in gap.values()), gap
    deaf_gap = module.loss_gap(Deaf(), n=8, noises=1)
    assert all(row["wrong shape"] == 0 == row["wrong colour"] for row in deaf_gap.values()), deaf_gap


def _load_reward_ceiling():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("reward_ceiling", BENCH.parent / "reward_ceiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reward_ceiling_pairs_one_prompts_images_and_scores_both_references(tmp_path: Path) -> None:
    """`reward_ceiling.py` on a tiny render-only annotation set: pairs stay within a prompt, and the
    labels' and the CNN's accuracies are accuracies."""
    from qirl.rewards.annotate import AnnotateConfig, annotate

    module = _load_reward_ceiling()
    a, b = module.same_prompt_pairs(["x", "y", "x", "x", "y"])
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 2), (0, 3), (1, 4), (2, 3)]

    out = tmp_path / "ann"
    list(annotate(AnnotateConfig(out_dir=str(out), n_prompts=8, samples_per_prompt=4, perturbed_fraction=1.0,
                                 edit_fraction=0.0, test_fraction=0.5, pairs_per_prompt=1)))
    result = module.main(["--data", str(out), "--cnn-steps", "2"])
    assert result["pairs"] > 0 and 0.0 <= result["labels"] <= 1.0 and 0.0 <= result["cnn"] <= 1.0
    assert 0.0 < result["oracle_within_share"] <= 1.0


def test_within_prompt_share_separates_within_from_between_prompt_variation() -> None:
    module = _load_reward_ceiling()
    prompts = ["x", "x", "y", "y"]
    assert module.within_prompt_share(torch.tensor([0.0, 0.0, 1.0, 1.0]), prompts) == 0.0  # ranks prompts only
    assert module.within_prompt_share(torch.tensor([0.0, 1.0, 0.0, 1.0]), prompts) == 1.0  # only within


def test_reward_ceiling_reports_each_question_of_a_reward_model(tmp_path: Path) -> None:
    """`--model`: the built-in pointwise model asked each question, with its own and another prompt's text."""
    from qirl.rewards.annotate import AnnotateConfig, annotate
    from qirl.rewards.vlm import builtin_reward_path

    module = _load_reward_ceiling()
    out = tmp_path / "ann"
    list(annotate(AnnotateConfig(out_dir=str(out), n_prompts=8, samples_per_prompt=4, perturbed_fraction=1.0,
                                 edit_fraction=0.0, test_fraction=0.5, pairs_per_prompt=1)))
    model = str(builtin_reward_path("pointwise"))
    report = module.main(["--data", str(out), "--model", model])["models"][model]
    assert set(report) == {"quality", "fidelity", "alignment"}
    for row in report.values():
        assert 0.0 <= row["same_prompt"] <= 1.0 and 0.0 <= row["same_prompt_other_text"] <= 1.0
        assert 0.0 <= row["within_share"] <= 1.0


def test_edit_group_spread_counts_groups_whose_rollouts_disagree() -> None:
    """`edit_group_spread.py`: a group whose rollouts all score the same has no spread; a tiny run works."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("edit_group_spread", BENCH.parent / "edit_group_spread.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    success = np.array([[0.0, 0.0], [0.0, 100.0]])  # [P=2, G=2]: only the second group disagrees
    stats = module.group_spread(success, success / 2)
    assert stats["groups_with_success_spread"] == 0.5
    assert stats["success_sd"] == 25.0 and stats["overall_sd"] == 12.5 and stats["overall"] == 12.5

    out = module.main(["--prompts", "2", "--group", "2", "--steps", "2", "--window", "1"])
    assert 0.0 <= out["overall"] <= 100.0 and 0.0 <= out["groups_with_success_spread"] <= 1.0
    per_step = module.main(["--prompts", "2", "--group", "2", "--steps", "2", "--per-step"])["per_step"]
    assert [r["sde_step"] for r in per_step] == [0, 1]
    assert all(0.0 <= r["groups_with_success_spread"] <= 1.0 for r in per_step)
