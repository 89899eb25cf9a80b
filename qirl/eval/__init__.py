"""Evaluation: benchmark pillars (`bench`), pairwise arenas with Elo / Bradley-Terry ratings (`arena`,
`ratings`), and an offline report (`report`). See docs/eval.md."""
