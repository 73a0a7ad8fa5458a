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
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase, ProcessorMixin

PROCESSOR_FILE = "processor_config.json"
IGNORE_INDEX = -100


@dataclass
class ChatFormat:
    """Turn markers around each message. The user chunk ends with the assistant prefix, so a
    prompt built for generation and a training example tokenize identically up to the reply.
    `system`, when set, is sent first in every conversation (the released TroL models were
    trained with one)."""

    user_prefix: str = "<|user|>\n"
    assistant_prefix: str = "<|assistant|>\n"
    turn_suffix: str = "<|end|>\n"
    system_prefix: str = ""
    system: str = ""

    def system_turn(self) -> str:
        return f"{self.system_prefix}{self.system}{self.turn_suffix}" if self.system else ""

    def jinja(self, image_placeholder: str = "<image>") -> str:
        """The same format as a chat template, for apply_chat_template. A message's content is
        a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts (an
        image part becomes the placeholder and a newline, as build_prompt writes it)."""
        q = json.dumps
        content = (
            "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
            f"{{% if part['type'] == 'image' %}}{{{{ {q(image_placeholder + chr(10))} }}}}"
            "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        )
        return (
            "{{ bos_token }}"
            f"{{{{ {q(self.system_turn())} }}}}"
            "{% for m in messages %}{% if m['role'] == 'user' %}"
            f"{{{{ {q(self.user_prefix)} }}}}{content}{{{{ {q(self.turn_suffix)} }}}}"
            f"{{% else %}}{{{{ {q(self.assistant_prefix)} }}}}{content}{{{{ {q(self.turn_suffix)} }}}}"
            "{% endif %}{% endfor %}"
            f"{{% if add_generation_prompt %}}{{{{ {q(self.assistant_prefix)} }}}}{{% endif %}}"
        )


@dataclass
class ImageSettings:
    size: int = 490
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    resample: str = "bicubic"
    # Dynamic tiling (InternViT-style): {"min_tiles", "max_tiles", "thumbnail"}; None: one
    # square resize per image. `size` is then the tile side.
    tiling: dict | None = None


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


class TroLProcessor(ProcessorMixin):
    """Called like transformers processors: `processor(text=[...], images=[...], return_tensors="pt")`.

    Each `image_placeholder` in a text is one image, consumed from `images` in order. An image
    becomes one or more tiles (one without tiling), each tile `image_seq_length` copies of
    `image_token`, the whole run wrapped in `image_start`/`image_end` (e.g. "<img>"…"</img>").
    `pixel_values` holds every tile of every image in that order. Batches are left-padded.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_seq_length: int,
        image: ImageSettings | None = None,
        chat: ChatFormat | None = None,
        image_token: str = "<image>",
        image_placeholder: str = "<image>",
        image_start: str = "",
        image_end: str = "",
    ):
        self.image_seq_length = image_seq_length
        self.image = image or ImageSettings()
        self.chat = chat or ChatFormat()
        super().__init__(tokenizer, chat_template=self.chat.jinja(image_placeholder))
        self.image_token = image_token
        self.image_placeholder = image_placeholder
        self.image_start, self.image_end = image_start, image_end
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"image_token {image_token!r} is not in the tokenizer's vocabulary")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (left padding for batched generation)")

    # -- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(directory)
        settings = {
            "processor_class": type(self).__name__,
            "image_token": self.image_token,
            "image_placeholder": self.image_placeholder,
            "image_start": self.image_start,
            "image_end": self.image_end,
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
            **{k: settings[k] for k in ("image_token", "image_placeholder", "image_start", "image_end") if k in settings},
        )

    # -- images ----------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        """Side of one square tile (or of the one resized image without tiling)."""
        return self.image.size

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """PIL image of any mode → uint8 (tiles, 3, size, size), not yet normalised: 4× less to
        move between processes than floats; `normalize` finishes the job where the model runs."""
        size = self.image.size
        rgb = to_rgb(image)
        if self.image.tiling:
            from .tiling import tile_image

            tiles = tile_image(rgb, tile_size=size, **self.image.tiling)
        else:
            tiles = [rgb.resize((size, size), resample=Image.Resampling[self.image.resample.upper()])]
        return np.stack([np.asarray(t, dtype=np.uint8) for t in tiles]).transpose(0, 3, 1, 2).copy()

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (…, 3, H, W) → float32 normalised, on the tensor's own device."""
        mean = torch.tensor(self.image.mean, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.image.std, device=pixels.device).view(3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """PIL image → float32 normalised: (3, size, size) without tiling, else (tiles, 3, size, size)."""
        pixels = self.normalize(torch.from_numpy(self.prepare_image(image))).numpy()
        return pixels if self.image.tiling else pixels[0]

    def _pixels(self, image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Any accepted image form → float32 (tiles, 3, size, size)."""
        if not isinstance(image, Image.Image) and not self._is_prepared(image):
            image = Image.fromarray(np.asarray(image.cpu() if isinstance(image, torch.Tensor) else image))  # raw H×W(×C)
        if isinstance(image, Image.Image):
            image = self.prepare_image(image)
        # Tensors stay on their device (normalise on the GPU); arrays may be read-only views: copy.
        pixels = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.array(image))
        pixels = self.normalize(pixels) if pixels.dtype == torch.uint8 else pixels.float()
        return pixels.unsqueeze(0) if pixels.dim() == 3 else pixels

    def _is_prepared(self, array: Any) -> bool:
        """(3, S, S) or (tiles, 3, S, S) at this processor's size; anything else is a raw image."""
        shape = tuple(array.shape)
        return len(shape) in (3, 4) and shape[-3:] == (3, self.image.size, self.image.size)

    def image_tokens(self, tiles: int) -> str:
        return self.image_start + self.image_token * (tiles * self.image_seq_length) + self.image_end

    # -- text ------------------------------------------------------------------------------
    def build_prompt(self, prompt: str, with_image: bool = True) -> str:
        """A one-turn chat (after the system turn, if any) ending where the reply begins."""
        return self.chat.system_turn() + self._user_turn(prompt, with_image)

    def _user_turn(self, content: str, with_image: bool = False) -> str:
        content = f"{self.image_placeholder}\n{content}" if with_image else content
        return self.chat.user_prefix + content + self.chat.turn_suffix + self.chat.assistant_prefix

    def _expand(self, text: str, tiles: list[int]) -> str:
        """Each placeholder, in order, becomes its image's token run."""
        parts = text.split(self.image_placeholder)
        if len(parts) - 1 != len(tiles):
            raise ValueError(f"text holds {len(parts) - 1} {self.image_placeholder} placeholders for {len(tiles)} images")
        return parts[0] + "".join(self.image_tokens(n) + part for n, part in zip(tiles, parts[1:]))

    def _encode(self, text: str, tiles: list[int] | None = None) -> list[int]:
        expanded = self._expand(text, tiles if tiles is not None else [1] * text.count(self.image_placeholder))
        return self.tokenizer(expanded, add_special_tokens=False)["input_ids"]

    def _bos(self) -> list[int]:
        return [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []

    def __call__(
        self,
        text: str | list[str] | None = None,
        images: Image.Image | list[Image.Image | np.ndarray | None] | None = None,
        return_tensors: str = "pt",
        padding_side: str = "left",
        **_ignored: Any,  # transformers' callers pass padding=True etc.; rows are always padded
    ) -> BatchFeature:
        if text is None:
            raise ValueError("text is required: build it with processor.build_prompt(...) or apply_chat_template")
        texts = [text] if isinstance(text, str) else list(text)
        if isinstance(images, Image.Image):
            images = [images]
        # apply_chat_template passes one list of images per conversation: flatten, order kept.
        images = [im for item in (images or []) for im in (item if isinstance(item, (list, tuple)) else [item])]
        bos = self.tokenizer.bos_token
        # A chat template already wrote the BOS token: don't add a second one.
        texts_have_bos = [bool(bos) and t.startswith(bos) for t in texts]
        texts = [t[len(bos):] if has else t for t, has in zip(texts, texts_have_bos)]
        pixels = [self._pixels(im) for im in (images or []) if im is not None]
        placeholders = sum(t.count(self.image_placeholder) for t in texts)
        if placeholders != len(pixels):
            raise ValueError(f"texts hold {placeholders} {self.image_placeholder} placeholders but {len(pixels)} images were given")
        tiles = iter([p.shape[0] for p in pixels])
        # A caption batch repeats one prompt (with hundreds of image tokens) for every row:
        # each distinct (text, tile counts) is tokenised once.
        encoded: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        rows = []
        for t in texts:
            key = (t, tuple(next(tiles) for _ in range(t.count(self.image_placeholder))))
            if key not in encoded:
                encoded[key] = self._bos() + self._encode(t, list(key[1]))
            rows.append(encoded[key])
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
            data["pixel_values"] = torch.cat(pixels)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        return BatchFeature(data=data)

    def batch_decode(self, token_ids, **kwargs) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(token_ids, **kwargs)

    # -- training --------------------------------------------------------------------------
    def encode_conversation(
        self, turns: list[dict[str, str]], has_image: bool, max_length: int | None = None, image_tiles: int = 1
    ) -> dict[str, Any] | None:
        """Token ids and labels for a chat; labels cover assistant replies (and their end
        marker) only. `turns` alternate {"role": "user"|"assistant", "content": str}; the image
        (if any) has `image_tiles` tiles.

        The whole conversation is tokenized at once and labels are taken from character
        offsets, so a reply tokenizes exactly as it does after a generation prompt (a
        SentencePiece tokenizer would otherwise give a reply encoded on its own a word prefix).
        Over `max_length` the tail is cut ("truncated": True); if that would cut into the
        image tokens or leave no assistant token to learn from, returns None (drop the row).
        """
        turns = [dict(t) for t in turns]
        mark = self.image_placeholder
        if any(mark in t["content"] for t in turns if t["role"] != "user"):
            raise ValueError(f"{mark} may only appear in a user turn")
        n_placeholders = sum(t["content"].count(mark) for t in turns)
        if has_image and n_placeholders == 0:
            first_user = next((t for t in turns if t["role"] == "user"), None)
            if first_user is None:
                raise ValueError("conversation has an image but no user turn to attach it to")
            first_user["content"] = f"{mark}\n{first_user['content']}"
        elif n_placeholders != (1 if has_image else 0):
            raise ValueError(f"conversation holds {n_placeholders} {mark} placeholders for {int(has_image)} image")
        text, replies = self.chat.system_turn(), []
        reply_open = False  # a user chunk ends with the assistant prefix
        for turn in turns:
            role = turn["role"]
            if role == "user":
                text += self._expand(self._user_turn(turn["content"]), [image_tiles] * turn["content"].count(mark))
            elif role == "assistant":
                text += "" if reply_open else self.chat.assistant_prefix
                replies.append((len(text), len(text) + len(turn["content"] + self.chat.turn_suffix)))
                text += turn["content"] + self.chat.turn_suffix
            else:
                raise ValueError(f"turn role {role!r}: expected 'user' or 'assistant'")
            reply_open = role == "user"
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = self._bos() + list(enc["input_ids"])
        in_reply = [any(start < end_r and end > start_r for start_r, end_r in replies) for start, end in enc["offset_mapping"]]
        labels = [IGNORE_INDEX] * len(self._bos()) + [t if r else IGNORE_INDEX for t, r in zip(enc["input_ids"], in_reply)]
        truncated = max_length is not None and len(ids) > max_length
        if truncated:
            ids, labels = ids[:max_length], labels[:max_length]
            if ids.count(self.image_token_id) != (image_tiles * self.image_seq_length if has_image else 0):
                return None
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return {"input_ids": ids, "labels": labels, "truncated": truncated}

    def collate(self, encodings: list[dict[str, Any]], pixel_values: list[np.ndarray | None]) -> dict[str, torch.Tensor]:
        """Right-padded training batch (labels padded with -100); every tile of every image,
        in row order, in one `pixel_values` tensor."""
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
        present = [self._pixels(p) for p in pixel_values if p is not None]
        if present:
            batch["pixel_values"] = torch.cat(present)
        return batch
