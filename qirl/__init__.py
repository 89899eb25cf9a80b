"""qirl: post-train flow-matching image models with reinforcement learning."""

__version__ = "0.1.0"
