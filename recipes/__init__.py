"""qirl's built-in recipes, installed as the `qirl.recipes` package data (this folder is the one copy).

Run one by name from any folder (`qirl grpo t2i`), list them (`qirl recipes list`) or copy one out to edit
(`qirl recipes cp t2i my_t2i.yaml`); see `qirl.builtin_recipes`.
"""
