"""`VLMReward`: a vision-language model as a reward, pointwise (score distribution) or pairwise (scalar head).

Pointwise (the report's adopted paradigm). The VLM reads the rating prompt (prompting.py) and answers
`[<reasoning> ]Score: k`. At the score position (the token after the marker) its logits restricted to the
tokens "1".."5" give p = softmax(z_1..z_5); the reward is the expectation normalised to [0, 1]:

    E = sum_k k p_k,        reward = (E - 1) / 4

With `cot=True` the model first writes its reasoning (greedy `generate`, at most `max_cot_tokens` tokens,
stopped at "Score:"); the distribution is read after the marker appended to that reasoning. A model
that never writes the marker is cut at `max_cot_tokens` and given it.

Pairwise (the report's Bradley-Terry baseline). A linear head on the last hidden state at the final
token (the marker's last token, the same position the pointwise model reads) gives a scalar r. Bradley-
Terry fixes r only up to a shift, so training stores the mean and std of r over the training images and
the reward is a standardised logistic, monotone in r (GRPO normalises per group anyway, DESIGN.md step 4):

    reward = sigmoid((r - mean_train) / std_train)     in (0, 1), 0.5 = a typical training image

Rows whose task the model does not judge (`config.tasks`), and edit rows without a source image, get NaN.

Edit rows show [source, result]. With `edit_view: pair_diff` they also show the change as a third image,
the signed per-pixel difference around mid-grey (`change_image`):

    change = 127.5 + (result - source) / 2     (uint8 RGB, so 128 where nothing changed)

A 32 x 32 image reaches the decoder as 16 tokens, so "did the right object change, and to what" is a
comparison across 32 tokens for the pair view; the change image puts it in one image's tokens
(docs/rewards.md, "The learned edit reward").
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import StoppingCriteria, StoppingCriteriaList

from qirl.data import publish_mode, to_pil
from qirl.errors import UserError
from qirl.files import read_json
from qirl.models.qwen_vl import IMAGE_ONLY_PROCESSORS, TinyVLMSpec
from qirl.rewards.base import TASKS, RewardModel, RewardRecord
from qirl.rewards.vlm import backbone as bb
from qirl.rewards.vlm.data import quiet_progress
from qirl.rewards.vlm.losses import expectation, normalised_reward
from qirl.rewards.vlm.prompting import DIMENSIONS, MARKER_RE, answer_prefix, chat_text, split_at_marker

logger = logging.getLogger(__name__)

MODES = ("pointwise", "pairwise")
EDIT_VIEWS = ("pair", "pair_diff")  # an edit row shows [source, result] | + the change (module docstring)
META_FILE = "vlm_reward.json"
HEAD_FILE = "head.safetensors"
FORMAT = "qirl.vlm_reward"


@dataclass
class VLMRewardConfig:
    """What a VLM reward is and how it runs. `path` None = the embedded tiny Qwen2.5-VL (`tiny` sizes)."""

    mode: str = "pointwise"  # pointwise | pairwise
    dimension: str = "alignment"  # quality | fidelity | alignment | overall: the question asked at score time
    cot: bool = False  # pointwise only: reason first, then score
    max_cot_tokens: int = 48
    path: str | None = None  # a local VLM checkpoint folder (Qwen2.5-VL / Qwen3-VL); None = embedded tiny
    dtype: str = "auto"  # auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 16  # images per forward when scoring
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # the tasks it judges; others get NaN
    edit_view: str = "pair"  # pair: an edit row shows [source, result] | pair_diff: + the change image
    seed: int = 0  # initialisation of the embedded model and of the pairwise head
    tiny: TinyVLMSpec = field(default_factory=TinyVLMSpec)
    head_mean: float = 0.0  # pairwise: reward = sigmoid((r - head_mean) / head_std), set by training
    head_std: float = 1.0

    def validate(self, where: str = "model") -> None:
        if self.mode not in MODES:
            raise UserError(f"{where}.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.dimension not in DIMENSIONS:
            raise UserError(
                f"{where}.dimension must be one of {', '.join(DIMENSIONS)}, got {self.dimension!r}"
            )
        if self.cot and self.mode != "pointwise":
            raise UserError(f"{where}.cot: chain of thought is for pointwise models only")
        if self.max_cot_tokens < 1 or self.batch_size < 1:
            raise UserError(f"{where}.max_cot_tokens and {where}.batch_size must be positive")
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise UserError(
                f"{where}.tasks must be a non-empty subset of {', '.join(TASKS)}, got {self.tasks}"
            )
        if self.edit_view not in EDIT_VIEWS:
            views = ", ".join(EDIT_VIEWS)
            raise UserError(f"{where}.edit_view must be one of {views}, got {self.edit_view!r}")
        if self.head_std <= 0:
            raise UserError(f"{where}.head_std must be positive, got {self.head_std}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> VLMRewardConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{where}: unknown VLM reward config key(s) {', '.join(unknown)}")
        data = dict(data)
        tiny = data.pop("tiny", None) or {}
        try:
            cfg = cls(**data, tiny=TinyVLMSpec(**tiny))
        except TypeError as err:
            raise UserError(f"{where}: malformed VLM reward config ({err})") from None
        cfg.validate(where)
        return cfg


def change_image(source: Image.Image, result: Image.Image) -> Image.Image:
    """The edit's signed change as an RGB image, ``127.5 + (result - source) / 2`` per channel (module
    docstring): mid-grey where nothing changed, brighter where the result gained a channel, darker where
    it lost one."""
    if source.size != result.size:
        source = source.resize(result.size, Image.BILINEAR)
    src = np.asarray(source.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    out = np.asarray(result.convert("RGB"), dtype=np.float32)  # [H, W, 3]
    return Image.fromarray(np.clip(np.rint(127.5 + (out - src) / 2), 0, 255).astype(np.uint8), "RGB")


class MarkerStop(StoppingCriteria):
    """Stop a row once its generated text contains "Score:" (matched on text, so any tokenizer works)."""

    def __init__(self, tokenizer: Any, start: int, window: int = 8):
        self.tokenizer, self.start, self.window = tokenizer, start, window

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        tail = input_ids[:, self.start :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor(
            [bool(MARKER_RE.search(t)) for t in texts], dtype=torch.bool, device=input_ids.device
        )


class VLMReward(RewardModel):
    """A VLM reward model (see the module docstring); `score` is batched by `config.batch_size`."""

    def __init__(
        self,
        config: VLMRewardConfig | None = None,
        *,
        _parts: tuple[Any, Any, dict[str, Tensor] | None] | None = None,
    ):
        self.config = config = copy.deepcopy(config) if config is not None else VLMRewardConfig()
        config.validate()
        self.device = bb.resolve_device(config.device)
        self.dtype = bb.resolve_dtype(config.dtype, self.device)
        if _parts is not None:
            model, processor, head_state = _parts
        elif config.path is None:
            model, processor = bb.build_embedded(config.tiny, config.seed)
            head_state = None
        else:
            model, processor = bb.load_backbone(config.path, self.dtype)
            head_state = None
        where = config.path or "embedded VLM tokenizer"
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.score_ids = bb.score_token_ids(self.tokenizer, where)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if hasattr(processor.image_processor, "merge_size") and hasattr(model.config, "vision_config"):
            bb.check_token_counts(self.model, processor, 32)  # processor and vision tower must agree
        hidden = self.model.get_output_embeddings().weight.shape[1]
        self.head: nn.Linear | None = None
        if config.mode == "pairwise":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed + 1)
                self.head = nn.Linear(hidden, 1)
                nn.init.normal_(self.head.weight, std=hidden**-0.5)
                nn.init.zeros_(self.head.bias)
            if head_state is not None:
                self.head.load_state_dict(head_state)
            self.head.to(self.device).eval()  # float32 whatever the backbone dtype: r is a tiny computation
        self.name = f"vlm_{config.mode}{'_cot' if config.cot else ''}_{config.dimension}"
        self.tasks = tuple(config.tasks)

    # ------------------------------------------------------------------------------------ plumbing

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return params + (list(self.head.parameters()) if self.head is not None else [])

    def train(self, mode: bool = True) -> VLMReward:
        self.model.train(mode)
        if self.head is not None:
            self.head.train(mode)
        return self

    def eval(self) -> VLMReward:
        return self.train(False)

    def state_dict(self) -> dict[str, Tensor]:
        """Backbone tensors under `model.`, head tensors under `head.` (for training checkpoints)."""
        out = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.head is not None:
            out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        if self.head is not None:
            self.head.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("head.")})

    def visual_tokens(self, size: int) -> int:
        """Decoder tokens one `size`x`size` image becomes (processor and model checked to agree)."""
        return bb.check_token_counts(self.model, self.processor, size)

    def encode(
        self,
        images: Sequence[Sequence[Image.Image]],
        prompts: Sequence[str],
        tasks: Sequence[str],
        completions: Sequence[str],
        dimensions: Sequence[str] | None = None,
        padding_side: str = "left",
    ) -> dict[str, Tensor]:
        """A model batch: per row the rating prompt for its images (an edit: [source, edited], and the
        change with `edit_view: pair_diff`) plus a completion (`answer_prefix(...)`); see
        `backbone.encode`."""
        dims = dimensions or [self.config.dimension] * len(prompts)
        diff = self.config.edit_view == "pair_diff"
        rows = list(zip(images, prompts, dims, tasks, strict=True))
        views = [[*imgs, change_image(*imgs)] if diff and t == "edit" else imgs for imgs, _, _, t in rows]
        texts = [chat_text(self.processor, p, d, t, diff and t == "edit") for _, p, d, t in rows]
        return bb.encode(self.processor, views, texts, completions, padding_side)

    def hidden(self, batch: dict[str, Tensor]) -> Tensor:
        return bb.hidden_states(self.model, batch, self.device)  # [B, L, H]

    def score_logits(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """[B, L, H] hidden, [B] positions -> [B, 5] logits of "1".."5" (the LM head's rows for them)."""
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]  # [B, H]
        lm_head = self.model.get_output_embeddings()
        ids = torch.tensor(self.score_ids, device=h.device)
        bias = lm_head.bias[ids] if getattr(lm_head, "bias", None) is not None else None
        return F.linear(h, lm_head.weight[ids], bias).float()

    def scalar(self, hidden: Tensor, positions: Tensor) -> Tensor:
        """[B, L, H], [B] -> [B] raw pairwise reward r (float32)."""
        assert self.head is not None, "scalar head exists in pairwise mode only"
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]  # [B, H]
        return self.head(h.float()).squeeze(-1)

    # ------------------------------------------------------------------------------------ scoring

    def _rows(self, images: Tensor, records: Sequence[RewardRecord]) -> list[list[Image.Image] | None]:
        """What each row shows the VLM: [image], or [source, image] for an edit; None where not judged."""
        rows: list[list[Image.Image] | None] = []
        for img, rec in zip(images, records, strict=True):
            if rec.task not in self.tasks or (rec.task == "edit" and rec.source is None):
                rows.append(None)
            else:
                rows.append([to_pil(rec.source), to_pil(img)] if rec.task == "edit" else [to_pil(img)])
        return rows

    @torch.no_grad()
    def generate_reasoning(
        self, images: Sequence[Sequence[Image.Image]], prompts: Sequence[str], tasks: Sequence[str]
    ) -> list[str]:
        """Greedy CoT: the text each row writes before "Score:" (at most `max_cot_tokens` tokens)."""
        batch = self.encode(images, prompts, tasks, [""] * len(prompts))
        start = batch["input_ids"].shape[1]
        stop = StoppingCriteriaList([MarkerStop(self.tokenizer, start)])
        out = self.model.generate(
            **bb.model_inputs(batch, self.device),
            max_new_tokens=self.config.max_cot_tokens,
            do_sample=False,
            stopping_criteria=stop,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
        return [split_at_marker(t)[0] for t in texts]

    @torch.no_grad()
    def _forward_rows(self, rows: list[list[Image.Image]], prompts: list[str], tasks: list[str]) -> Tensor:
        """Pointwise: [N, 5] probabilities; pairwise: [N] raw r."""
        reasoning: list[str | None] = [None] * len(rows)
        if self.config.cot:
            reasoning = list(self.generate_reasoning(rows, prompts, tasks))
        batch = self.encode(rows, prompts, tasks, [answer_prefix(r) for r in reasoning])
        hidden = self.hidden(batch)
        if self.config.mode == "pairwise":
            return self.scalar(hidden, batch["score_pos"])
        return torch.softmax(self.score_logits(hidden, batch["score_pos"]), dim=-1)

    def run_rows(
        self,
        rows: Sequence[list[Image.Image] | None],
        prompts: Sequence[str],
        tasks: Sequence[str],
        width: int = 0,
    ) -> Tensor:
        """The batched core of scoring, on PIL rows (None = not judged -> NaN): [N, 5] probabilities
        (`width=5`, pointwise) or [N] raw r (pairwise)."""
        out = torch.full((len(rows), width) if width else (len(rows),), float("nan"))
        idx = [
            i for i, (r, t) in enumerate(zip(rows, tasks, strict=True)) if r is not None and t in self.tasks
        ]
        was_training = self.model.training
        self.eval()
        try:
            for s in range(0, len(idx), self.config.batch_size):
                chunk = idx[s : s + self.config.batch_size]
                res = self._forward_rows(
                    [rows[i] for i in chunk], [prompts[i] for i in chunk], [tasks[i] for i in chunk]
                )  # type: ignore[misc]
                out[chunk] = res.float().cpu()
        finally:
            self.train(was_training)
        return out

    def reward_rows(
        self, rows: Sequence[list[Image.Image] | None], prompts: Sequence[str], tasks: Sequence[str]
    ) -> Tensor:
        """[N] rewards in [0, 1] for PIL rows (what `score` computes after converting its tensors)."""
        if self.config.mode == "pointwise":
            return normalised_reward(expectation(self.run_rows(rows, prompts, tasks, width=5)))
        return torch.sigmoid(
            (self.run_rows(rows, prompts, tasks) - self.config.head_mean) / self.config.head_std
        )

    def score_distribution(
        self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord] | None = None
    ) -> Tensor:
        """[B, 5] probabilities of the scores 1..5 (pointwise models); NaN rows where not judged."""
        if self.config.mode != "pointwise":
            raise UserError("score_distribution needs a pointwise VLM reward (this one is pairwise)")
        records = list(records) if records is not None else [RewardRecord()] * len(prompts)
        return self.run_rows(self._rows(images, records), prompts, [r.task for r in records], width=5)

    def score(self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord]) -> Tensor:
        """[B] rewards in [0, 1] (module docstring), NaN for rows it does not judge."""
        return self.reward_rows(self._rows(images, records), prompts, [r.task for r in records])

    def explain(
        self, images: Tensor, prompts: Sequence[str], records: Sequence[RewardRecord] | None = None
    ) -> list[str | None]:
        """The CoT reasoning per row (None where not judged); needs `cot=True`."""
        if not self.config.cot:
            raise UserError("explain needs a chain-of-thought VLM reward (model.cot=true)")
        records = list(records) if records is not None else [RewardRecord()] * len(prompts)
        rows = self._rows(images, records)
        out: list[str | None] = [None] * len(prompts)
        idx = [i for i, r in enumerate(rows) if r is not None]
        for s in range(0, len(idx), self.config.batch_size):
            chunk = idx[s : s + self.config.batch_size]
            texts = self.generate_reasoning(
                [rows[i] for i in chunk], [prompts[i] for i in chunk], [records[i].task for i in chunk]
            )  # type: ignore[misc]
            for i, t in zip(chunk, texts, strict=True):
                out[i] = t
        return out

    # ------------------------------------------------------------------------------------ save / load

    def save(self, path: str | Path) -> Path:
        """Write a self-contained folder atomically: the backbone (safetensors + config.json), the
        tokenizer and image processor files, `head.safetensors` (pairwise) and `vlm_reward.json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            with quiet_progress():
                self.model.save_pretrained(str(tmp), safe_serialization=True)
                if isinstance(self.processor, IMAGE_ONLY_PROCESSORS):
                    # Parts only: a processor_config.json naming the image-only class would stop
                    # AutoProcessor (with torchvision) from building the stock processor.
                    self.tokenizer.save_pretrained(str(tmp))
                    self.processor.image_processor.save_pretrained(str(tmp))
                    template = self.processor.chat_template
                    if isinstance(template, str):  # e.g. from a checkpoint's chat_template.json
                        (tmp / "chat_template.jinja").write_text(template)
                else:
                    self.processor.save_pretrained(str(tmp))
            if self.head is not None:
                save_file(
                    {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                    str(tmp / HEAD_FILE),
                )
            config = asdict(self.config) | {"path": None}
            meta = {"format": FORMAT, "version": 1, "config": config}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.rename(path, old)
            publish_mode(tmp)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> VLMReward:
        """Load a folder written by `save`; `overrides` replace run-time config keys (device, dtype,
        batch_size, dimension, cot, max_cot_tokens, tasks). A missing or corrupt file is a `UserError`."""
        path = Path(path)
        meta_file = path / META_FILE
        if not meta_file.is_file():
            raise UserError(f"{meta_file}: not a qirl VLM reward folder (no {META_FILE})")
        meta = read_json(meta_file, "reward model metadata")
        if (
            not isinstance(meta, dict)
            or meta.get("format") != FORMAT
            or not isinstance(meta.get("config"), dict)
        ):
            raise UserError(f"{meta_file}: not a qirl VLM reward description")
        data = meta["config"] | {k: v for k, v in overrides.items() if v is not None}
        data["path"] = str(path)
        config = VLMRewardConfig.from_dict(data, str(meta_file))
        head_state = None
        if config.mode == "pairwise":
            head_file = path / HEAD_FILE
            if not head_file.is_file():
                raise UserError(f"{head_file}: missing pairwise head")
            try:
                head_state = load_file(str(head_file))
            except (SafetensorError, OSError, ValueError) as err:
                raise UserError(f"{head_file}: corrupt ({err})") from None
        model, processor = bb.load_backbone(
            path, bb.resolve_dtype(config.dtype, bb.resolve_device(config.device))
        )
        try:
            return cls(config, _parts=(model, processor, head_state))
        except RuntimeError as err:  # head shape mismatch
            raise UserError(f"{path}: head does not fit the backbone ({str(err).splitlines()[0]})") from None
