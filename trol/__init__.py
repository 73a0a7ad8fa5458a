"""TroL (Traversal of Layers) vision-language model. PyTorch + transformers only."""

from .config import TRAVERSAL_MODES, TroLConfig
from .mixer import TroLMixer
from .modeling import TroLForConditionalGeneration, TroLPreTrainedModel
from .traversal import TroLCache, TroLDecoderLayer

__all__ = [
    "TRAVERSAL_MODES",
    "TroLCache",
    "TroLConfig",
    "TroLDecoderLayer",
    "TroLForConditionalGeneration",
    "TroLMixer",
    "TroLPreTrainedModel",
]
from .inference import CaptionResult, Captioner, load_model  # noqa: E402
from .processing import ChatFormat, ImageSettings, TroLProcessor  # noqa: E402

__all__ += ["CaptionResult", "Captioner", "ChatFormat", "ImageSettings", "TroLProcessor", "load_model"]

# Auto classes: AutoModelForImageTextToText / AutoProcessor / pipeline("image-text-to-text")
# open a TroL folder after `import trol`, with no remote code.
from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

AutoModelForImageTextToText.register(TroLConfig, TroLForConditionalGeneration, exist_ok=True)
AutoProcessor.register(TroLConfig, TroLProcessor, exist_ok=True)
