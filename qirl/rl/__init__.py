"""Reinforcement learning for flow policies: GRPO (`qirl.rl.grpo`: `GrpoRecipe`, `grpo`)."""
