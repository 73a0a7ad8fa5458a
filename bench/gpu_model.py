"""A torch-only TroL of the released shapes, for GPU machines where nothing but torch is
installed (no transformers, no internet): random weights, the same equations as trol/.

Language model: Llama-family decoder (RMSNorm, rotary positions, grouped-query attention,
SwiGLU), each layer traversed as in trol/traversal.py: h1 = L(x), h2 = L(h1),
s = 0.5·tanh(w·h1 + b) + 0.5, out = (1 − s)·h1 + s·h2. Modes off / prefill (one-token
decode steps run once; the second pass's K/V are not cached) / full (every token
traverses; the second pass has its own preallocated cache). Vision: a pre-norm ViT whose
patch tokens (optionally pixel-shuffled) go through a 2-layer projector.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None


@dataclass(frozen=True)
class LMShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


@dataclass(frozen=True)
class VisionShape:
    layers: int
    hidden: int
    heads: int
    ffn: int
    image_size: int
    patch: int
    tiles: int  # tiles per image (thumbnail included)
    shuffle: int  # 1: none; 2: pixel shuffle 0.5 (4 patches → 1 token)

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch) ** 2 // (self.shuffle ** 2)


@dataclass(frozen=True)
class ModelShape:
    name: str
    lm: LMShape
    vision: VisionShape
    text_tokens: int = 40

    @property
    def image_tokens(self) -> int:
        return self.vision.tiles * self.vision.tokens_per_tile


SHAPES = {
    # InternLM2-1.8B + CLIP-L/14 at 490 px: 35² = 1,225 image tokens.
    "trol-1.8b": ModelShape("trol-1.8b", LMShape(24, 2048, 16, 8, 8192, 92544),
                            VisionShape(24, 1024, 16, 4096, 490, 14, 1, 1)),
    # Phi-3-mini + InternViT-300M at 448 px, 4 tiles + thumbnail, pixel shuffle: 5 × 256 tokens.
    "trol-3.8b": ModelShape("trol-3.8b", LMShape(32, 3072, 32, 32, 8192, 32064),
                            VisionShape(24, 1024, 16, 4096, 448, 14, 5, 2)),
    # For checking this file on a CPU.
    "tiny": ModelShape("tiny", LMShape(2, 64, 4, 2, 128, 256), VisionShape(2, 32, 4, 64, 32, 8, 2, 2), 8),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated (batch, max_len, kv_heads, head_dim) keys and values for one pass of
    every layer, filled left to right."""

    def __init__(self, layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int, like: torch.Tensor):
        shape = (layers, batch, max_len, kv_heads, head_dim)
        self.keys = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.values = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.length = 0


class DecoderLayer(nn.Module):
    def __init__(self, s: LMShape):
        super().__init__()
        self.s, self.head_dim = s, s.hidden // s.heads
        self.norm_1 = nn.Parameter(torch.ones(s.hidden))
        self.qkv = nn.Linear(s.hidden, (s.heads + 2 * s.kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(s.heads * self.head_dim, s.hidden, bias=False)
        self.norm_2 = nn.Parameter(torch.ones(s.hidden))
        self.gate_up = nn.Linear(s.hidden, 2 * s.ffn, bias=False)
        self.down = nn.Linear(s.ffn, s.hidden, bias=False)

    def attend(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: KVCache | None,
               index: int, start: int) -> torch.Tensor:
        """Attention for new tokens at positions start…; K/V of earlier tokens come from
        `cache` (if any), and the new ones are written there when `cache` is given."""
        batch, n, _ = x.shape
        s, hd = self.s, self.head_dim
        q, k, v = self.qkv(rms_norm(x, self.norm_1)).view(batch, n, s.heads + 2 * s.kv_heads, hd).split(
            [s.heads, s.kv_heads, s.kv_heads], dim=2)
        cos, sin = rope
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            cache.keys[index, :, start:start + n] = k
            cache.values[index, :, start:start + n] = v
            k, v = cache.keys[index, :, :start + n], cache.values[index, :, :start + n]
        if HAS_FLASH_ATTN and x.is_cuda:
            from flash_attn import flash_attn_func

            attn = flash_attn_func(q, k, v, causal=True)  # bottom-right aligned: new tokens see all past
        else:
            if n > 1 and start > 0:  # SDPA's causal mask is top-left aligned; this bench never needs it
                raise NotImplementedError("multi-token steps after a prefix are not used by this benchmark")
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=n > 1, enable_gqa=s.kv_heads != s.heads)
            attn = attn.transpose(1, 2)
        return self.out(attn.reshape(batch, n, -1))

    def forward(self, x, rope, cache, index, start):
        x = x + self.attend(x, rope, cache, index, start)
        gate, up = self.gate_up(rms_norm(x, self.norm_2)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Mixer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(hidden, 1)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        s = 0.5 * torch.tanh(self.gate(h1)) + 0.5
        return torch.lerp(h1, h2, s)


class TraversedLM(nn.Module):
    def __init__(self, s: LMShape):
        super().__init__()
        self.s = s
        self.embed = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.layers))
        self.mixers = nn.ModuleList(Mixer(s.hidden) for _ in range(s.layers))
        self.norm = nn.Parameter(torch.ones(s.hidden))
        self.head = nn.Linear(s.hidden, s.vocab, bias=False)
        head_dim = s.hidden // s.heads
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def rope(self, start: int, n: int, like: torch.Tensor):
        positions = torch.arange(start, start + n, device=like.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.to(like.device))
        angles = torch.cat((angles, angles), dim=-1)[None, :, None, :]
        return angles.cos().to(like.dtype), angles.sin().to(like.dtype)

    def new_caches(self, batch: int, max_len: int, mode: str, like: torch.Tensor) -> list[KVCache]:
        s = self.s
        count = 2 if mode == "full" else 1
        return [KVCache(s.layers, batch, max_len, s.kv_heads, s.hidden // s.heads, like) for _ in range(count)]

    def forward(self, x: torch.Tensor, caches: list[KVCache], mode: str) -> torch.Tensor:
        """Embeddings (batch, n, d) at positions caches[0].length… → last-position logits."""
        start, n = caches[0].length, x.shape[1]
        rope = self.rope(start, n, x)
        traverse = mode == "full" or (mode == "prefill" and n > 1)
        for i, (layer, mixer) in enumerate(zip(self.layers, self.mixers)):
            h1 = layer(x, rope, caches[0], i, start)
            if not traverse:
                x = h1
                continue
            # prefill mode: the second pass of a multi-token pass sees only itself (start 0).
            x = mixer(h1, layer(h1, rope, caches[1] if mode == "full" else None, i, start))
        for cache in caches:
            cache.length = start + n
        return self.head(rms_norm(x[:, -1], self.norm))


class VisionTower(nn.Module):
    def __init__(self, v: VisionShape, out_dim: int):
        super().__init__()
        self.v = v
        self.patch = nn.Conv2d(3, v.hidden, v.patch, v.patch, bias=False)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(v.hidden, v.heads, v.ffn, activation="gelu",
                                                               batch_first=True, norm_first=True, dropout=0.0)
                                    for _ in range(v.layers))
        width = v.hidden * v.shuffle ** 2
        self.projector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim), nn.GELU(),
                                       nn.Linear(out_dim, out_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(images·tiles, 3, S, S) → (images·tiles, tokens_per_tile, out_dim)."""
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        if self.v.shuffle > 1:
            f, grid = self.v.shuffle, self.v.image_size // self.v.patch
            b, _, c = x.shape
            x = x.reshape(b, grid // f, f, grid // f, f, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, f * f * c)
        return self.projector(x)


class TroLShaped(nn.Module):
    def __init__(self, shape: ModelShape):
        super().__init__()
        self.shape = shape
        self.vision = VisionTower(shape.vision, shape.lm.hidden)
        self.lm = TraversedLM(shape.lm)

    def prompt_embeddings(self, pixels: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        """Image tokens first, then the text: (batch, image_tokens + text_tokens, d)."""
        batch = text_ids.shape[0]
        image = self.vision(pixels).reshape(batch, self.shape.image_tokens, -1)
        return torch.cat([image.to(self.lm.embed.weight.dtype), self.lm.embed(text_ids)], dim=1)

    @torch.inference_mode()
    def caption(self, pixels: torch.Tensor, text_ids: torch.Tensor, new_tokens: int, mode: str) -> torch.Tensor:
        """Greedy decoding of exactly `new_tokens` tokens per row (no end-of-text stop, so
        every mode and batch does equal work)."""
        x = self.prompt_embeddings(pixels, text_ids)
        caches = self.lm.new_caches(x.shape[0], x.shape[1] + new_tokens, mode, x)
        logits = self.lm(x, caches, mode)
        out = []
        for _ in range(new_tokens):
            token = logits.argmax(-1)
            out.append(token)
            logits = self.lm(self.lm.embed(token)[:, None], caches, mode)
        return torch.stack(out, dim=1)


def lm_prefill_flops(s: LMShape, batch: int, tokens: int, traverses: bool) -> int:
    """Matmul + causal attention FLOPs of a prefill (last-position logits only)."""
    hd = s.hidden // s.heads
    per_token = 2 * (s.hidden * (s.heads + 2 * s.kv_heads) * hd + s.heads * hd * s.hidden + 3 * s.hidden * s.ffn)
    attention = 2 * 2 * s.heads * hd * tokens * (tokens + 1) // 2
    layer = tokens * per_token + attention
    return batch * (s.layers * layer * (2 if traverses else 1) + 2 * s.hidden * s.vocab)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
