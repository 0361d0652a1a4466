"""Input processing identical to transformers' Gemma4UnifiedProcessor, in NumPy (spec processors.md).

    from gemma4_eqx.processing import Processor, parse_response
    proc = Processor.from_pretrained(folder_or_repo_id)
    batch = proc(text=["<|image|>What is shown?"], images=[[image]])
    prompt = proc.apply_chat_template(conversation, add_generation_prompt=True)   # Google's 12B-it format
    reply = parse_response(proc.decode(new_ids))   # {"content", "reasoning", "tool_calls"}

No JAX, torch or transformers here: numpy, PIL, tokenizers, jinja2 and soundfile (PyAV for video files).
"""

from ._batch import BatchFeature
from .audio import AudioFeatureExtractor, load_audio, resample_audio
from .chat_parser import parse_response
from .chat_template import builtin_template, render_chat_template
from .fields import ProcessorConfigError
from .image import SUPPORTED_SOFT_TOKENS, ImageProcessor, aspect_ratio_preserving_size, load_image
from .processor import Processor
from .resize import resize_bicubic_antialias
from .sandbox import TemplateBudgetError, TemplateLimits
from .tokenizer import Tokenizer
from .video import VideoMetadata, VideoProcessor, load_video, sample_frame_indices

__all__ = [
    "AudioFeatureExtractor",
    "BatchFeature",
    "ImageProcessor",
    "Processor",
    "ProcessorConfigError",
    "SUPPORTED_SOFT_TOKENS",
    "TemplateBudgetError",
    "TemplateLimits",
    "Tokenizer",
    "VideoMetadata",
    "VideoProcessor",
    "aspect_ratio_preserving_size",
    "builtin_template",
    "load_audio",
    "load_image",
    "load_video",
    "parse_response",
    "render_chat_template",
    "resample_audio",
    "resize_bicubic_antialias",
    "sample_frame_indices",
]
