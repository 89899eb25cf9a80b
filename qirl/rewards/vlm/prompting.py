"""What the reward VLM reads and writes: the rating prompt, the answer format, CoT reasoning texts.

Prompt (one user turn after a short system turn; a T2I row shows one image, an edit row the source
then the edited image):

    Rate the image for the prompt: <prompt>. Dimension: <dimension>. Answer with a score from 1 to 5.
    Rate the edited image for the instruction: <instruction>. Dimension: ... (edits; source shown first)

A model with ``edit_view: pair_diff`` is shown a third image on an edit row, the change from the source
to the result, and its edit prompt says so (`EDIT_DIFF_QUESTION`).

It goes through the processor's chat template when the checkpoint has one (a real Qwen2.5-VL / Qwen3-VL),
else through `simple_chat`, which writes the same ChatML markup Qwen uses.

Answer (the assistant turn): `[<reasoning> ]Score: <k>`. The score is always read at the position
right after the marker `Score: ` (trailing space: Qwen's BPE splits a space before a digit into its own
token, so the next token is the bare digit). Without chain of thought the marker alone is the answer
prefix; with it the model first writes the reasoning (greedy, stopping at the marker) and the marker is
appended to what it wrote. Training texts are identical, so train and score see the same positions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

DIMENSIONS: tuple[str, ...] = ("quality", "fidelity", "alignment", "overall")
SYSTEM = "You are a careful image rater."
T2I_QUESTION = (
    "Rate the image for the prompt: {prompt}. Dimension: {dimension}. Answer with a score from 1 to 5."
)
EDIT_QUESTION = (
    "The first image is the source and the second is the edited image. "
    "Rate the edited image for the instruction: {prompt}. Dimension: {dimension}. Answer with a score from 1 to 5."
)
# Every word here is in the shipped vocabulary (tests/test_rewards_vlm.py checks it): no "third".
EDIT_DIFF_QUESTION = (
    "The first image is the source, the second is the edited image and image three is the change from "
    "the source to the edited image. "
    "Rate the edited image for the instruction: {prompt}. Dimension: {dimension}. "
    "Answer with a score from 1 to 5."
)
MARKER = "Score: "
MARKER_RE = re.compile(r"score\s*:", re.IGNORECASE)
_CHATML = "<|im_start|>{role}\n{content}<|im_end|>\n"
_VISION = "<|vision_start|><|image_pad|><|vision_end|>"


def template_texts() -> list[str]:
    """The fixed words of every prompt (for the embedded vocabulary)."""
    questions = [T2I_QUESTION, EDIT_QUESTION, EDIT_DIFF_QUESTION]
    return [SYSTEM, *questions, MARKER, "system user assistant", NO_REASONS]


def n_images(task: str, diff: bool = False) -> int:
    """Images a row shows: 1 for T2I; source and result for an edit, plus the change with `diff`."""
    return (3 if diff else 2) if task == "edit" else 1


def question(prompt: str, dimension: str, task: str, diff: bool = False) -> str:
    text = prompt.strip().rstrip(".!? ")
    template = (EDIT_DIFF_QUESTION if diff else EDIT_QUESTION) if task == "edit" else T2I_QUESTION
    return template.format(prompt=text, dimension=dimension)


def messages(prompt: str, dimension: str, task: str, diff: bool = False) -> list[dict[str, Any]]:
    """Chat messages in the transformers multimodal format (an image entry per image shown)."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images(task, diff))]
    content.append({"type": "text", "text": question(prompt, dimension, task, diff)})
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
        {"role": "user", "content": content},
    ]


def simple_chat(prompt: str, dimension: str, task: str, diff: bool = False) -> str:
    """ChatML text for a tokenizer without a chat template (the embedded one), generation prompt included."""
    return (
        _CHATML.format(role="system", content=SYSTEM)
        + _CHATML.format(
            role="user", content=_VISION * n_images(task, diff) + question(prompt, dimension, task, diff)
        )
        + "<|im_start|>assistant\n"
    )


def has_chat_template(processor: Any) -> bool:
    """Whether the checkpoint ships a chat template (a real Qwen-VL); the embedded tokenizer has none."""
    return bool(getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None))


def chat_text(processor: Any, prompt: str, dimension: str, task: str, diff: bool = False) -> str:
    """The full prompt text up to the assistant turn, through the checkpoint's chat template if any."""
    if has_chat_template(processor):
        return processor.apply_chat_template(
            messages(prompt, dimension, task, diff), tokenize=False, add_generation_prompt=True
        )
    return simple_chat(prompt, dimension, task, diff)


NO_REASONS = "no specific problems noted"


def reasoning_text(reasons: Sequence[str] | None) -> str:
    """The CoT text templated from an annotation's structured reasons: "<r1>; <r2>." (or a fixed line)."""
    parts = [r.strip().rstrip(".") for r in (reasons or []) if r and r.strip()]
    return ("; ".join(parts) if parts else NO_REASONS) + "."


def split_at_marker(text: str) -> tuple[str, bool]:
    """Generated text -> (reasoning before the first "Score:", whether the marker was found)."""
    m = MARKER_RE.search(text)
    return (text[: m.start()].strip(), True) if m else (text.strip(), False)


def answer_prefix(reasoning: str | None) -> str:
    """The assistant text up to the score position: `Score: ` or `<reasoning> Score: `."""
    return f"{reasoning.strip()} {MARKER}" if reasoning else MARKER
