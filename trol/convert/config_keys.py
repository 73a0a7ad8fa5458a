"""Reading a released config.json key by key: every key is mapped into the converted backbone
config, ignored because it cannot change the model's numbers, or refused because it would and
the converter does not reproduce it. Nothing passes through unread.

The released files were written by transformers 4.36-4.45. Their `PretrainedConfig.to_dict()`
holds the same 56 generic keys in every version of that range (output switches, generation
defaults, fine-tuning labels, token ids, bookkeeping) besides each model's own fields;
`save_pretrained` drops the generic ones still at their defaults, except inside nested
configs (TroL-3.8B's `llm_config` / `vision_config`), which it writes whole.
"""

from __future__ import annotations

import logging
from typing import Any

from .checkpoint import ConversionError

log = logging.getLogger("trol.convert")

# Generic keys that only steer outputs, generation defaults or task heads. Generation defaults
# do not change logits; the converted folder writes its own generation_config.json (greedy,
# the family's end-of-turn tokens), as the release's code passes its settings to generate().
GENERATION_DEFAULTS = frozenset({
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
GENERIC_IGNORED = GENERATION_DEFAULTS | frozenset({
    # what a forward returns, not what it computes
    "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    # dtype metadata: the converter keeps the dtype the weights are stored in
    "torch_dtype", "dtype", "use_bfloat16", "tf_legacy_loss",
    # encoder-decoder and BERT-style switches no decoder-only backbone here reads; feed-forward
    # chunking computes the same values in pieces
    "is_decoder", "cross_attention_hidden_size", "chunk_size_feed_forward",
    # task heads, tokenizer and hub bookkeeping
    "architectures", "finetuning_task", "id2label", "label2id", "num_labels", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "sep_token_id", "decoder_start_token_id",
    "transformers_version", "model_type", "auto_map", "attn_implementation",
})
# Generic keys whose other values build a different network than the released one.
GENERIC_FIXED = {
    "is_encoder_decoder": (False, "an encoder-decoder is not a released TroL"),
    "add_cross_attention": (False, "cross-attention layers are not part of a released TroL"),
    "tie_encoder_decoder": (False, "an encoder-decoder is not a released TroL"),
    "pruned_heads": ({}, "pruned attention heads are not reproduced"),
}
_MISSING = object()


class ConfigSection:
    """One mapping of config.json (the top level, `llm_config` or `vision_config`).

    `take` reads a key the conversion uses, `ignore` / `fixed` classify the others; `finish`
    applies the generic rules to what is left and fails on anything still unclassified.
    """

    def __init__(self, data: Any, prefix: str = ""):
        if not isinstance(data, dict):
            raise ConversionError(f"config.json {prefix.rstrip('.') or 'top level'} must be a JSON object, "
                                  f"got {type(data).__name__}")
        self.data, self.prefix = data, prefix
        self.seen: set[str] = set()
        self.ignored: list[str] = []

    def path(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self.data

    def take(self, key: str, default: Any = _MISSING) -> Any:
        """A key the conversion maps; without a default it must be present."""
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ConversionError(f"config.json has no {self.path(key)}; a released TroL config always holds it")
        return default

    def ignore(self, *keys: str) -> None:
        """Keys that cannot change the numbers, whatever their value."""
        for key in keys:
            if key in self.data and key not in self.seen:
                self.seen.add(key)
                self.ignored.append(self.path(key))

    def fixed(self, key: str, expected: Any, why: str) -> None:
        """A key the conversion reproduces only at one value (absent counts as that value)."""
        if key not in self.data or key in self.seen:
            return
        value = self.data[key]
        if value != expected and not (expected == {} and not value):
            raise ConversionError(f"config.json {self.path(key)}={value!r} is not supported: {why}; the converter "
                                  f"reproduces {key}={expected!r}, as the released checkpoints have it")
        self.ignore(key)

    def finish(self) -> list[str]:
        """Classify what no family rule claimed; return the ignored keys (with their section)."""
        for key in [k for k in self.data if k not in self.seen]:
            if key in GENERIC_FIXED:
                self.fixed(key, *GENERIC_FIXED[key])
            elif key in GENERIC_IGNORED or key.startswith("_"):  # "_…": transformers' own bookkeeping
                self.ignore(key)
            elif key == "quantization_config":
                raise ConversionError(f"config.json {self.path(key)}: a quantized checkpoint cannot be converted "
                                      "losslessly; convert the released full-precision files (quantize when loading)")
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            shown = ", ".join(f"{self.path(k)}={self.data[k]!r}" for k in unknown[:5])
            raise ConversionError(f"config.json has keys the converter does not know: {shown}; it cannot tell "
                                  "whether they change the model's numbers, so it stops (a released TroL config "
                                  "has none of them)")
        return self.ignored


def log_ignored(ignored: list[str]) -> None:
    if ignored:
        log.info("config.json: %d keys ignored (they do not change the numbers): %s", len(ignored),
                 ", ".join(sorted(ignored)))
