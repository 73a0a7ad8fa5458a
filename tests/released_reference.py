"""Independent references for the released TroL models, written from the equations (not from
our model code): InternLM2 with packed qkv and partial LoRA, traversal with the shared gate
in the released "prefill" behaviour, InternViT with pixel shuffle and its projector, and
TroL-3.8B's Phi-3 with its longrope scaling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class InternLM2Reference:
    """Weights as released (names of the InternLM2/XComposer2 form). `step` runs new tokens
    with the released rules: multi-token passes traverse and cache the first pass's K/V;
    one-token passes run each layer once."""

    def __init__(self, W: dict[str, torch.Tensor], cfg: dict, gates: dict[str, torch.Tensor], scale: float):
        self.W, self.cfg, self.gates, self.scale = W, cfg, gates, scale
        self.heads, self.kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg["hidden_size"] // self.heads
        self.eps = cfg["rms_norm_eps"]
        self.inv_freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, self.hd, 2).float() / self.hd)

    def linear(self, name, x, mask):
        y = x @ self.W[f"{name}.ffn.weight"].T
        update = (x @ self.W[f"{name}.lora_A.weight"].T) @ self.W[f"{name}.lora_B.weight"].T * self.scale
        return y + mask[..., None] * update

    def layer(self, i, x, mask, pos, keys_mask, past):
        p = f"model.layers.{i}."
        b, t, _ = x.shape
        group = self.heads // self.kv
        qkv = self.linear(p + "attention.wqkv", rms(x, self.W[p + "attention_norm.weight"], self.eps), mask)
        qkv = qkv.view(b, t, self.kv, group + 2, self.hd)
        q = qkv[:, :, :, :group].reshape(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = qkv[:, :, :, group].transpose(1, 2), qkv[:, :, :, group + 1].transpose(1, 2)
        angles = pos[:, None, :, None].float() * self.inv_freq
        cos, sin = torch.cat([angles, angles], -1).cos().float(), torch.cat([angles, angles], -1).sin().float()
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        new_kv = (k, v)
        if past is not None:
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = q @ k.transpose(-1, -2) / self.hd**0.5
        total = k.shape[2]
        causal = torch.ones(t, total, dtype=torch.bool).tril(total - t)
        allowed = causal[None, None] & keys_mask[:, None, None, :].bool()
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.linear(p + "attention.wo", attn, mask)
        h = rms(x, self.W[p + "ffn_norm.weight"], self.eps)
        ffn = self.linear(p + "feed_forward.w2", F.silu(self.linear(p + "feed_forward.w1", h, mask)) * self.linear(p + "feed_forward.w3", h, mask), mask)
        return x + ffn, new_kv

    def step(self, embeds, mask, pos, keys_mask, cache):
        """One forward over new tokens; returns logits and the updated cache (list per layer)."""
        x, out_cache = embeds, []
        for i in range(self.cfg["num_hidden_layers"]):
            past = cache[i] if cache else None
            h1, kv1 = self.layer(i, x, mask, pos, keys_mask, past)
            if x.shape[1] > 1:
                h2, _ = self.layer(i, h1, mask, pos, keys_mask, past)
                s = 0.5 * torch.tanh(h1 @ self.gates[f"{i}.weight"].T + self.gates[f"{i}.bias"]) + 0.5
                x = (1 - s) * h1 + s * h2
            else:
                x = h1
            out_cache.append(kv1 if past is None else (torch.cat([past[0], kv1[0]], 2), torch.cat([past[1], kv1[1]], 2)))
        logits = rms(x, self.W["model.norm.weight"], self.eps) @ self.W["output.weight"].T
        return logits, out_cache

    def greedy(self, embeds, mask, attention_mask, steps):
        pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self.step(embeds, mask, pos, attention_mask, None)
        prompt_logits, ids = logits, []
        keys_mask, last = attention_mask, pos[:, -1:]
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            ids.append(token)
            keys_mask = torch.cat([keys_mask, torch.ones_like(token)], 1)
            last = last + 1
            emb = self.W["model.tok_embeddings.weight"][token]
            logits, cache = self.step(emb, torch.zeros_like(token, dtype=torch.float), last, keys_mask, cache)
        return prompt_logits, torch.cat(ids, 1)


def internvit_features(W: dict[str, torch.Tensor], vit: dict, pixels: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternViT (packed qkv, layer scales, no final norm) → drop CLS → pixel shuffle → LN-MLP."""
    v = "vision_model."
    d, heads = vit["hidden_size"], vit["num_attention_heads"]
    patches = F.conv2d(pixels, W[v + "embeddings.patch_embedding.weight"], W[v + "embeddings.patch_embedding.bias"],
                       stride=vit["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([W[v + "embeddings.class_embedding"].expand(len(pixels), 1, d), patches], 1)
    x = x + W[v + "embeddings.position_embedding"]
    eps = vit["layer_norm_eps"]
    for i in range(vit["num_hidden_layers"]):
        p = f"{v}encoder.layers.{i}."
        h = F.layer_norm(x, (d,), W[p + "norm1.weight"], W[p + "norm1.bias"], eps)
        b, n, _ = h.shape
        qkv = (h @ W[p + "attn.qkv.weight"].T + W[p + "attn.qkv.bias"]).view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-1, -2)) * (d // heads) ** -0.5).softmax(-1) @ qkv[2]
        attn = attn.transpose(1, 2).reshape(b, n, d) @ W[p + "attn.proj.weight"].T + W[p + "attn.proj.bias"]
        x = x + attn * W[p + "ls1"]
        h = F.layer_norm(x, (d,), W[p + "norm2.weight"], W[p + "norm2.bias"], eps)
        mlp = F.gelu(h @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"]) @ W[p + "mlp.fc2.weight"].T + W[p + "mlp.fc2.bias"]
        x = x + mlp * W[p + "ls2"]
    x = x[:, 1:]
    side = int(x.shape[1] ** 0.5)
    # Pixel shuffle as the release does it: fold column pairs, transpose, fold row pairs, transpose back.
    n, c = len(x), x.shape[-1]
    y = x.reshape(n, side, side, c).reshape(n, side, int(side * ratio), int(c / ratio)).permute(0, 2, 1, 3)
    y = y.reshape(n, int(side * ratio), int(side * ratio), int(c / ratio**2)).permute(0, 2, 1, 3)
    y = y.reshape(n, -1, y.shape[-1])
    y = F.layer_norm(y, (y.shape[-1],), W["vision_proj.0.weight"], W["vision_proj.0.bias"])
    y = F.gelu(y @ W["vision_proj.1.weight"].T + W["vision_proj.1.bias"])
    return y @ W["vision_proj.3.weight"].T + W["vision_proj.3.bias"]


def phi3_rope(llm: dict, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for Phi-3 positions (batch, seq): with longrope ("su"), the long factors divide
    the frequencies once any position reaches original_max_position_embeddings, and cos/sin
    are scaled by sqrt(1 + ln(s) / ln(original)), s = max_position_embeddings / original."""
    hd = llm["hidden_size"] // llm["num_attention_heads"]
    inv_freq = 1.0 / llm["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    scale = 1.0
    scaling = llm.get("rope_scaling")
    if scaling:
        original = llm["original_max_position_embeddings"]
        long = int(positions.max()) + 1 > original
        inv_freq = inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"])
        ratio = llm["max_position_embeddings"] / original
        scale = math.sqrt(1 + math.log(ratio) / math.log(original)) if ratio > 1 else 1.0
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], -1)
    return angles.cos() * scale, angles.sin() * scale


class Phi3Reference:
    """TroL-3.8B's LLM as released (names under `language_model.`): Phi-3 with fused qkv and
    gate/up projections, one TroL gate per layer, every multi-token pass traversed."""

    def __init__(self, W: dict[str, torch.Tensor], llm: dict, gates: dict[str, torch.Tensor]):
        self.W, self.llm, self.gates = W, llm, gates
        self.heads, self.kv = llm["num_attention_heads"], llm["num_key_value_heads"]
        self.hd = llm["hidden_size"] // self.heads
        self.eps = llm["rms_norm_eps"]

    def layer(self, i: int, x, cos, sin, allowed):
        W, p = self.W, f"language_model.model.layers.{i}."
        b, t, _ = x.shape
        qkv = rms(x, W[p + "input_layernorm.weight"], self.eps) @ W[p + "self_attn.qkv_proj.weight"].T
        q, k, v = qkv.split([self.heads * self.hd, self.kv * self.hd, self.kv * self.hd], -1)
        q = q.view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = (z.view(b, t, self.kv, self.hd).transpose(1, 2) for z in (k, v))
        q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
        group = self.heads // self.kv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = (q @ k.transpose(-1, -2) / self.hd**0.5).masked_fill(~allowed, torch.finfo(q.dtype).min)
        x = x + (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1) @ W[p + "self_attn.o_proj.weight"].T
        gate, up = (rms(x, W[p + "post_attention_layernorm.weight"], self.eps) @ W[p + "mlp.gate_up_proj.weight"].T).chunk(2, -1)
        return x + (up * F.silu(gate)) @ W[p + "mlp.down_proj.weight"].T

    def logits(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One prefill pass over left-padded rows; positions count real tokens only."""
        t = embeds.shape[1]
        if t > (self.llm.get("sliding_window") or t):
            raise ValueError("the reference has no sliding window; keep sequences within it")
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cos, sin = phi3_rope(self.llm, positions)
        allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & attention_mask[:, None, None, :].bool()
        x = embeds
        for i in range(self.llm["num_hidden_layers"]):
            h1 = self.layer(i, x, cos, sin, allowed)
            if t > 1:
                h2 = self.layer(i, h1, cos, sin, allowed)
                s = 0.5 * torch.tanh(h1 @ self.gates[f"{i}.weight"].T + self.gates[f"{i}.bias"]) + 0.5
                x = (1 - s) * h1 + s * h2
            else:
                x = h1
        return rms(x, self.W["language_model.model.norm.weight"], self.eps) @ self.W["language_model.lm_head.weight"].T
