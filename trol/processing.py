"""TroLProcessor: image preprocessing (PIL + numpy, no torchvision), the chat format with an
image placeholder, image-token expansion, left padding, and assistant-only training labels."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

PROCESSOR_FILE = "processor_config.json"
IGNORE_INDEX = -100


@dataclass
class ChatFormat:
    """Turn markers around each message. The user chunk ends with the assistant prefix, so a
    prompt built for generation and a training example tokenize identically up to the reply."""

    user_prefix: str = "<|user|>\n"
    assistant_prefix: str = "<|assistant|>\n"
    turn_suffix: str = "<|end|>\n"

    def jinja(self) -> str:
        """The same format as a tokenizer chat template, for tools that use apply_chat_template."""
        q = json.dumps
        return (
            "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
            f"{{{{ {q(self.user_prefix)} }}}}{{{{ m['content'] }}}}{{{{ {q(self.turn_suffix)} }}}}"
            f"{{% else %}}{{{{ {q(self.assistant_prefix)} }}}}{{{{ m['content'] }}}}{{{{ {q(self.turn_suffix)} }}}}"
            "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {q(self.assistant_prefix)} }}}}{{% endif %}}"
        )


@dataclass
class ImageSettings:
    size: int = 490
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    resample: str = "bicubic"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency goes onto white (a caption of a logo should not see a
    black box); 16-bit and float images are rescaled rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


class TroLProcessor:
    """Called like transformers processors: `processor(text=[...], images=[...], return_tensors="pt")`.

    Each `image_token` in a text is one image, consumed from `images` in order, and becomes
    `image_seq_length` copies of the image token. Batches are left-padded for generation.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_seq_length: int,
        image: ImageSettings | None = None,
        chat: ChatFormat | None = None,
        image_token: str = "<image>",
    ):
        self.tokenizer = tokenizer
        self.image_seq_length = image_seq_length
        self.image = image or ImageSettings()
        self.chat = chat or ChatFormat()
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"image_token {image_token!r} is not in the tokenizer's vocabulary")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (left padding for batched generation)")

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.chat_template = self.chat.jinja()
        self.tokenizer.save_pretrained(directory)
        settings = {
            "processor_class": type(self).__name__,
            "image_token": self.image_token,
            "image_seq_length": self.image_seq_length,
            "image": asdict(self.image),
            "chat": asdict(self.chat),
        }
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> "TroLProcessor":
        """A local folder, or a hub id (resolved through huggingface_hub like any model)."""
        path = Path(name_or_path)
        if path.is_dir():
            settings_file = path / PROCESSOR_FILE
        else:
            from huggingface_hub import hf_hub_download

            settings_file = Path(hf_hub_download(str(name_or_path), PROCESSOR_FILE, **hub_kwargs))
        if not settings_file.is_file():
            raise FileNotFoundError(f"{settings_file}: not a TroL model folder (no {PROCESSOR_FILE})")
        settings = json.loads(settings_file.read_text())
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **hub_kwargs)
        return cls(
            tokenizer,
            image_seq_length=settings["image_seq_length"],
            image=ImageSettings(**settings.get("image", {})),
            chat=ChatFormat(**settings.get("chat", {})),
            image_token=settings.get("image_token", "<image>"),
        )

    # -- images ----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.image.size

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """PIL image of any mode → float32 (3, size, size), resized and normalised."""
        size = self.image.size
        resample = Image.Resampling[self.image.resample.upper()]
        rgb = to_rgb(image).resize((size, size), resample=resample)
        arr = np.asarray(rgb, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.image.mean, np.float32)) / np.asarray(self.image.std, np.float32)
        return np.ascontiguousarray(arr.transpose(2, 0, 1))

    def _pixels(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = self.preprocess_image(image)
        return torch.tensor(np.asarray(image, dtype=np.float32))  # a copy: inputs may be read-only

    # -- text ------------------------------------------------------------------------------
    def build_prompt(self, prompt: str, with_image: bool = True) -> str:
        """A one-turn chat ending where the assistant's reply begins."""
        content = f"{self.image_token}\n{prompt}" if with_image else prompt
        return self.chat.user_prefix + content + self.chat.turn_suffix + self.chat.assistant_prefix

    def _encode(self, text: str) -> list[int]:
        expanded = text.replace(self.image_token, self.image_token * self.image_seq_length)
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def __call__(
        self,
        text: str | list[str],
        images: list[Image.Image | np.ndarray | None] | None = None,
        return_tensors: str = "pt",
        padding_side: str = "left",
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text)
        pixels = [self._pixels(im) for im in (images or []) if im is not None]
        placeholders = sum(t.count(self.image_token) for t in texts)
        if placeholders != len(pixels):
            raise ValueError(f"texts hold {placeholders} {self.image_token} placeholders but {len(pixels)} images were given")
        rows = [self._bos() + self._encode(t) for t in texts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        data: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixels:
            data["pixel_values"] = torch.stack(pixels)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        return BatchFeature(data=data)

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(token_ids, **kwargs)

    # -- training --------------------------------------------------------------------------
    def encode_conversation(
        self, turns: list[dict[str, str]], has_image: bool, max_length: int | None = None
    ) -> dict[str, Any] | None:
        """Token ids and labels for a chat; labels cover assistant replies (and their end
        marker) only. `turns` alternate {"role": "user"|"assistant", "content": str}.

        Over `max_length` the tail is cut ("truncated": True); if that would cut into the
        image tokens or leave no assistant token to learn from, returns None (drop the row).
        """
        turns = [dict(t) for t in turns]
        if any(self.image_token in t["content"] for t in turns if t["role"] != "user"):
            raise ValueError(f"{self.image_token} may only appear in a user turn")
        n_placeholders = sum(t["content"].count(self.image_token) for t in turns)
        if has_image and n_placeholders == 0:
            first_user = next((t for t in turns if t["role"] == "user"), None)
            if first_user is None:
                raise ValueError("conversation has an image but no user turn to attach it to")
            first_user["content"] = f"{self.image_token}\n{first_user['content']}"
        elif n_placeholders != (1 if has_image else 0):
            raise ValueError(f"conversation holds {n_placeholders} {self.image_token} placeholders for {int(has_image)} image")
        ids, labels = self._bos(), [IGNORE_INDEX] * len(self._bos())
        reply_open = False  # a user chunk ends with the assistant prefix
        for turn in turns:
            role = turn["role"]
            if role == "user":
                chunk = self._encode(self.build_prompt(turn["content"], with_image=False))
                reply = []
            elif role == "assistant":
                chunk = [] if reply_open else self._encode(self.chat.assistant_prefix)
                reply = self._encode(turn["content"] + self.chat.turn_suffix)
            else:
                raise ValueError(f"turn role {role!r}: expected 'user' or 'assistant'")
            ids += chunk + reply
            labels += [IGNORE_INDEX] * len(chunk) + reply
            reply_open = role == "user"
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
            if ids.count(self.image_token_id) != (self.image_seq_length if has_image else 0):
                return None
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return {"input_ids": ids, "labels": labels, "truncated": truncated}

    def collate(self, encodings: list[dict[str, Any]], pixel_values: list[np.ndarray | None]) -> dict[str, torch.Tensor]:
        """Right-padded training batch (labels padded with -100)."""
        width = max(len(e["input_ids"]) for e in encodings)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(encodings), width), pad, dtype=torch.long)
        labels = torch.full((len(encodings), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encodings), width), dtype=torch.long)
        for i, enc in enumerate(encodings):
            n = len(enc["input_ids"])
            input_ids[i, :n] = torch.tensor(enc["input_ids"])
            labels[i, :n] = torch.tensor(enc["labels"])
            attention_mask[i, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        present = [torch.tensor(np.asarray(p, dtype=np.float32)) for p in pixel_values if p is not None]
        if present:
            batch["pixel_values"] = torch.stack(present)
        return batch
