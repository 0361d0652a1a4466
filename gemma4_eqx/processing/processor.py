"""`Processor`: text + images + videos + audio -> the arrays the model takes (docs/spec/processors.md §1.5, §2, §3, §7, §11).

Call conventions follow transformers' `Gemma4UnifiedProcessor`: each `<|image|>` / `<|video|>` /
`<|audio|>` marker in the text is replaced, left to right across the batch, by the expansion of the
next item of that modality (`<|image>` + N x `<|image|>` + `<image|>`, `MM:SS <|image>` + n x
`<|video|>` + `<image|>` per video frame joined by spaces, `<|audio>` + M x `<|audio|>` + `<audio|>`),
then the text is tokenized. Outputs are numpy arrays with transformers' names.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import numpy as np

from ..model.masks import TokenType
from ._batch import BatchFeature, check_return_tensors
from .audio import AudioFeatureExtractor, load_audio
from .chat_template import (BUILTIN_TEMPLATE_NAME, CONTROL_TOKEN_END, CONTROL_TOKEN_START, builtin_template,
                            compile_template, control_token_patterns, control_tokens, extract_media,
                            locate_chat_template, mark_control_tokens, normalize_conversations, render_chat_template,
                            template_variables)
from .fields import check_fields, integer, section
from .files import WARNED_BUILTIN, processor_config, read_json, resolve_folder, save_processor
from .image import ImageProcessor, flatten_images
from .sandbox import TemplateLimits
from .tokenizer import Tokenizer
from .video import VideoMetadata, VideoProcessor, batch_videos, timestamp_strings

_TEXT_KEYS = {"add_special_tokens", "padding", "truncation", "max_length", "padding_side", "return_attention_mask",
              "sanitize_control_tokens"}
_AUDIO_KEYS = {"padding", "max_length", "truncation", "sampling_rate", "return_attention_mask"}
_IMAGE_KEYS = {"max_soft_tokens", "patch_size", "pooling_kernel_size", "do_resize", "do_rescale", "rescale_factor",
               "do_normalize", "image_mean", "image_std", "do_convert_rgb", "resample"}
_VIDEO_KEYS = _IMAGE_KEYS | {"num_frames", "fps", "do_sample_frames"}
# processor_config.json's own fields (kept for reference: the expansion of a media item is data dependent).
PROCESSOR_FIELDS = {"image_seq_length": integer(1, 1 << 20), "audio_seq_length": integer(1, 1 << 20),
                    "audio_ms_per_token": integer(1, 1 << 20)}


def _nest_images(images: Any) -> list[list[Any]] | None:
    """None, one image, a flat list (one sample) or a list of lists (one per sample) -> nested lists."""
    if images is None:
        return None
    if not isinstance(images, (list, tuple)):
        return [[images]]
    if not images:
        return None
    if all(isinstance(item, (list, tuple)) for item in images):
        return [list(item) for item in images]
    return [flatten_images(images)]


class Processor:
    """Gemma4UnifiedProcessor in NumPy: `tokenizer`, `image_processor`, `video_processor`, `feature_extractor`."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        video_processor: VideoProcessor | None = None,
        feature_extractor: AudioFeatureExtractor | None = None,
        chat_template: str | None = None,
        image_seq_length: int = 280,
        audio_seq_length: int = 750,
        audio_ms_per_token: int = 40,
    ):
        self.tokenizer = tokenizer
        self.image_processor = image_processor or ImageProcessor()
        self.video_processor = video_processor or VideoProcessor()
        self.feature_extractor = feature_extractor or AudioFeatureExtractor()
        self.chat_template = chat_template or builtin_template()
        # Where the template came from, for the errors of a template that fails or runs past its render budget.
        self.chat_template_name = "(the chat_template given to Processor)" if chat_template else BUILTIN_TEMPLATE_NAME
        self.image_seq_length = image_seq_length  # kept for reference: expansion is data dependent (§1.5)
        self.audio_seq_length = audio_seq_length
        self.audio_ms_per_token = audio_ms_per_token
        for name in ("image_token", "boi_token", "eoi_token", "video_token", "audio_token", "boa_token", "eoa_token"):
            token = getattr(tokenizer, name)
            if token is None:
                raise ValueError(f"the tokenizer has no {name} (expected e.g. {name} in tokenizer_config.json)")
            setattr(self, name, token)
            setattr(self, name + "_id", tokenizer.convert_tokens_to_ids(token))

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str | os.PathLike, revision: str | None = None,
                        token: str | bool | None = None, local_files_only: bool | None = None) -> "Processor":
        """Read tokenizer.json, tokenizer_config.json, processor_config.json and chat_template.jinja from a folder
        or a Hub repo id (resolved as `g4.load` does: `revision`, `token`, offline mode with a clear error).

        A folder without a chat template gets the built-in one (Google's 12B-it template, see chat_template.py)
        with a one-time warning naming the folder; transformers would refuse apply_chat_template there.
        """
        folder = resolve_folder(path_or_repo_id, revision=revision, token=token, local_files_only=local_files_only)
        tokenizer = Tokenizer.from_pretrained(folder)
        config_path = folder / "processor_config.json"
        config = read_json(config_path)
        check_fields(config, PROCESSOR_FIELDS, f"{config_path}: ")
        sources = {}  # section -> (its settings, where they were read, for messages)
        for key, fallback in (("image_processor", "preprocessor_config.json"),
                              ("video_processor", "video_preprocessor_config.json"), ("feature_extractor", None)):
            found = section(config, key, str(config_path))
            if found is not None:
                sources[key] = (found, f"{config_path}: {key}.")
            elif fallback is not None:
                sources[key] = (read_json(folder / fallback), f"{folder / fallback}: ")
            else:
                sources[key] = ({}, f"{config_path}: {key}.")
        if not sources["feature_extractor"][0]:
            legacy = read_json(folder / "preprocessor_config.json")
            if "audio_samples_per_token" in legacy:
                sources["feature_extractor"] = (legacy, f"{folder / 'preprocessor_config.json'}: ")
        template, template_origin = locate_chat_template(folder, tokenizer.config)
        if template is None and str(folder) not in WARNED_BUILTIN:
            WARNED_BUILTIN.add(str(folder))
            warnings.warn(f"{folder} has no chat template (chat_template.jinja, chat_template.json or a chat_template "
                          "in tokenizer_config.json): using gemma4_eqx's built-in Gemma 4 template, which renders as "
                          "google/gemma-4-12B-it's (transformers would refuse to apply a chat template here)",
                          UserWarning, stacklevel=2)
        proc = cls(
            tokenizer,
            ImageProcessor.from_dict(*sources["image_processor"]),
            VideoProcessor.from_dict(*sources["video_processor"]),
            AudioFeatureExtractor.from_dict(*sources["feature_extractor"]),
            chat_template=template,
            **{k: config[k] for k in PROCESSOR_FIELDS if k in config},
        )
        if template_origin is not None:
            proc.chat_template_name = template_origin
        return proc

    # ------------------------------------------------------------------ prompt expansion
    def image_replacement(self, num_soft_tokens: int) -> str:
        return f"{self.boi_token}{self.image_token * num_soft_tokens}{self.eoi_token}"

    def video_replacement(self, num_soft_tokens: int, metadata: VideoMetadata) -> str:
        frame = f"{self.boi_token}{self.video_token * num_soft_tokens}{self.eoi_token}"
        return " ".join(f"{t} {frame}" for t in timestamp_strings(metadata.timestamps))

    def audio_replacement(self, num_frames: int) -> str:
        return f"{self.boa_token}{self.audio_token * num_frames}{self.eoa_token}"

    def expand_placeholders(self, text: list[str], replacements: dict[str, list[str]]) -> list[str]:
        """Replace the i-th marker of each modality (counted across the batch) by its i-th replacement."""
        markers = {"image": self.image_token, "video": self.video_token, "audio": self.audio_token}
        # A marker the user typed under sanitize_control_tokens=True is wrapped in the private marks: not replaced.
        groups = [f"(?<!{CONTROL_TOKEN_START})(?P<{m}>{re.escape(markers[m])})" for m, r in replacements.items() if r]
        if not groups:
            return text
        pattern = re.compile("|".join(groups))
        iters = {m: iter(r) for m, r in replacements.items()}
        return [pattern.sub(lambda match: next(iters[match.lastgroup]), sample) for sample in text]

    def mm_token_type_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """0 text (delimiters included), 1 image, 2 video, 3 audio soft tokens (docs/spec/processors.md §4)."""
        types = np.full_like(input_ids, TokenType.TEXT)
        types[input_ids == self.image_token_id] = TokenType.IMAGE
        types[input_ids == self.video_token_id] = TokenType.VIDEO
        types[input_ids == self.audio_token_id] = TokenType.AUDIO
        return types

    # ------------------------------------------------------------------ main entry
    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        videos: Any = None,
        audio: Any = None,
        video_metadata: Any = None,
        *,
        text_kwargs: dict | None = None,
        images_kwargs: dict | None = None,
        videos_kwargs: dict | None = None,
        audio_kwargs: dict | None = None,
        return_tensors: str | None = "np",
        return_mm_token_type_ids: bool = True,
        return_metadata: bool = False,
        **kwargs: Any,
    ) -> BatchFeature:
        """Positional order is transformers' (images, text, videos, audio); keywords are clearer."""
        check_return_tensors(return_tensors)
        if text is None and _looks_like_text(images):
            raise TypeError(
                "images are strings that are no image files; the first positional argument is `images` "
                "(transformers' order): pass text=... by keyword"
            )
        if isinstance(text, str):
            text = [text]
        elif text is not None:
            text = list(text)
            if not all(isinstance(t, str) for t in text):
                raise TypeError("text must be a string or a list of strings")
        if text is not None and not text:
            raise ValueError("text is an empty list; expected one prompt string per sample")
        nested = _nest_images(images)
        if audio is not None:
            audio = [load_audio(a) if isinstance(a, (str, os.PathLike)) else a for a in _audio_list(audio)]
        if videos is not None:
            videos = batch_videos(videos)
        if nested and not text:
            text = [" ".join([self.image_token] * len(sample)) for sample in nested]
        if audio and not text:
            text = [self.audio_token] * len(audio)
        self._validate(text, nested, videos, audio)
        merged = _route_kwargs(kwargs, text_kwargs, images_kwargs, videos_kwargs, audio_kwargs)

        data = BatchFeature()
        replacements: dict[str, list[str]] = {"image": [], "video": [], "audio": []}
        if nested is not None:
            out = self.image_processor(flatten_images(nested), **merged["images"])
            replacements["image"] = [self.image_replacement(n) for n in out.pop("num_soft_tokens_per_image")]
            data.update(out)
        if videos is not None:
            out = self.video_processor(videos, video_metadata=video_metadata, **merged["videos"])
            metas = out.pop("video_metadata")
            tokens = out.pop("num_soft_tokens_per_video")
            replacements["video"] = [self.video_replacement(n, m) for n, m in zip(tokens, metas)]
            out["num_frames_per_video"] = np.asarray(out["num_frames_per_video"], dtype=np.int64)
            data.update(out)
            if return_metadata:
                data["video_metadata"] = metas
        if audio is not None:
            out = self.feature_extractor(audio, **merged["audio"])
            replacements["audio"] = [self.audio_replacement(int(m.sum())) for m in out["input_features_mask"]]
            data.update(out)
        if text is None:
            return data

        expanded = self.expand_placeholders(text, replacements)
        text_inputs = self._tokenize(expanded, merged["text"])
        mask = text_inputs.get("attention_mask")
        lengths = mask.sum(axis=1) if mask is not None else [len(row) for row in text_inputs["input_ids"]]
        empty = [i for i, n in enumerate(lengths) if n == 0]
        if empty:  # "" is fine where the tokenizer adds <bos> (as in transformers); a prompt of no token is not
            raise ValueError(f"text[{empty[0]}] is an empty prompt: it gives no token at all; expected some text "
                             f"(with one {self.image_token} / {self.video_token} / {self.audio_token} per media item)")
        for modality, token_id in (("image", self.image_token_id), ("video", self.video_token_id),
                                   ("audio", self.audio_token_id)):
            marker = getattr(self, f"{modality}_token")
            ids_count = [int((row == token_id).sum()) for row in text_inputs["input_ids"]]
            text_count = [_count_markers(sample, marker) for sample in expanded]
            if ids_count != text_count:
                raise ValueError(
                    f"{modality} soft tokens were cut: the text has {text_count} {marker} but input_ids keep "
                    f"{ids_count}; disable truncation or raise max_length"
                )
        result = BatchFeature(text_inputs)
        if return_mm_token_type_ids:
            result["mm_token_type_ids"] = self.mm_token_type_ids(text_inputs["input_ids"])
        result.update(data)
        return result

    def _tokenize(self, texts: list[str], text_kwargs: dict) -> BatchFeature:
        options = {"padding": True, **text_kwargs}
        if options.get("add_special_tokens") is None:
            # Exactly one <bos> (§4): a text that already starts with it gets none from the post-processor.
            options.pop("add_special_tokens", None)
            bos = self.tokenizer.bos_token
            starts = {bool(bos) and t.startswith(bos) for t in texts}
            if starts == {True}:
                options["add_special_tokens"] = False
            elif len(starts) > 1:
                raise ValueError(f"some texts start with {bos} and some do not; pass add_special_tokens explicitly")
        return self.tokenizer(texts, return_tensors="np", **options)

    def _validate(self, text: list[str] | None, nested: list | None, videos: list | None, audio: list | None) -> None:
        if text is None and nested is None:
            if videos is not None:
                raise ValueError(f"videos need a text with one {self.video_token} per video")
            raise ValueError("You must provide either `text` or `images` (got neither).")
        if text is None:
            return
        for modality, marker, items in (("images", self.image_token, flatten_images(nested) if nested else None),
                                         ("videos", self.video_token, videos), ("audio inputs", self.audio_token, audio)):
            found = sum(_count_markers(sample, marker) for sample in text)
            if items is not None and found != len(items):
                raise ValueError(
                    f"The total number of {marker} tokens in the prompts should be the same as the number of "
                    f"{modality} passed. Found total {found} {marker} tokens and {len(items)} {modality}."
                )
            if items is None and found:
                raise ValueError(f"Found {found} {marker} tokens in the text but no {modality} were passed.")
        if nested is not None:
            in_text = [_count_markers(sample, self.image_token) for sample in text]
            given = [len(sample) for sample in nested]
            if in_text != given:
                raise ValueError(
                    f"The number of {self.image_token} tokens in each prompt should be the same as the number of "
                    f"images passed. Found {in_text} {self.image_token} tokens and {given} images per sample "
                    "(pass images nested per sample: [[img, ...], ...])."
                )

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = "np",
        processor_kwargs: dict | None = None,
        sanitize_control_tokens: bool = False,
        template_limits: TemplateLimits | None = None,
        **kwargs: Any,
    ) -> str | list[str] | np.ndarray | BatchFeature:
        """Render conversation(s) with the chat template; with tokenize=True also run `__call__` on the
        media of the content blocks ({"type": "image", "image": ...}, "video", "audio").

        Extra keywords (enable_thinking=True, ...) go to the template. As in transformers, those the template
        never reads (e.g. images_kwargs={"max_soft_tokens": 70}, max_soft_tokens=70) also go to `__call__`,
        merged into `processor_kwargs`, with a warning that the dict is the preferred spelling.

        Control tokens (<|turn>, <turn|>, <|image|>, ...) written in the inputs are rendered as they are, so user text
        can open a turn; with `sanitize_control_tokens=True` (transformers' option, needs tokenize=True) every control
        token found in messages, tools, documents and template keywords is tokenized as plain text instead, and only
        those the template writes itself become control tokens (a `<|image|>` typed by the user then asks for no image).
        A role holding a control token or a line break is always refused, as are content given as a dict and content
        blocks of an unknown type.

        The template renders under `template_limits` (default `gemma4_eqx.processing.sandbox.DEFAULT_LIMITS`: steps,
        sizes, text produced, wall clock); one that runs past a budget raises TemplateBudgetError naming the template
        (its file) and the budget.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
        template = chat_template or self.chat_template
        template_name = "(the chat_template argument)" if chat_template else self.chat_template_name
        compile_template(template, template_name)  # a template too long or too deeply nested: an error naming it
        controls = control_tokens(self.tokenizer.added_tokens(), template)
        conversations, batched = normalize_conversations(conversation, controls)
        render_kwargs = kwargs
        if sanitize_control_tokens:
            if not tokenize:
                raise ValueError("sanitize_control_tokens=True needs tokenize=True (the marks only mean something to "
                                 "the tokenizer)")
            pattern, _ = control_token_patterns(controls)
            conversations = [mark_control_tokens(conv, pattern) for conv in conversations]
            tools, documents = mark_control_tokens(tools, pattern), mark_control_tokens(documents, pattern)
            render_kwargs = mark_control_tokens(kwargs, pattern)
        prompts = []
        for conv in conversations:
            prompt = render_chat_template(
                template, conv, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
                special_tokens=self.tokenizer.special_tokens_map, template_name=template_name,
                template_limits=template_limits, **render_kwargs,
            )
            if continue_final_message:
                prompt = _cut_after_final_message(prompt, conv[-1])
            prompts.append(prompt)
        if not tokenize:
            return prompts if batched else prompts[0]

        images, videos, video_metadata, audio = extract_media(conversations)
        call_kwargs = dict(processor_kwargs or {})
        spread = {k: v for k, v in kwargs.items() if k not in template_variables(template)}
        if spread:
            warnings.warn(f"apply_chat_template: passing {sorted(spread)} to the processor call; prefer "
                          "processor_kwargs={...} for keywords meant for it", stacklevel=2)
            twice = sorted(set(spread) & set(call_kwargs))
            if twice:
                raise ValueError(f"apply_chat_template: {twice} given both in processor_kwargs and as keywords")
            call_kwargs.update(spread)
        bos = self.tokenizer.bos_token
        if bos and prompts[0].startswith(bos):
            call_kwargs.setdefault("add_special_tokens", False)
        flat_videos = [v for sample in videos for v in sample]
        if flat_videos and any(m is not None for m in video_metadata) and "video_metadata" not in call_kwargs:
            call_kwargs["video_metadata"] = [{} if m is None else m for m in video_metadata]
        if sanitize_control_tokens:
            call_kwargs["sanitize_control_tokens"] = True
        out = self(
            text=prompts,
            images=images if any(images) else None,
            videos=flat_videos or None,
            audio=audio or None,
            return_tensors=return_tensors,
            **call_kwargs,
        )
        return out if return_dict else out["input_ids"]

    # ------------------------------------------------------------------ decoding and saving
    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str:
        """The tokenizer's decode: ids (a list or a 1-D array) -> text."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """One text per row of `sequences` (a list of id lists or a 2-D array)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def to_dict(self) -> dict:
        """processor_config.json as transformers' Gemma4UnifiedProcessor reads it."""
        return processor_config(self)

    def save_pretrained(self, folder: str | os.PathLike) -> list[str]:
        """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and processor_config.json into `folder`
        (created if needed) so that this class and transformers' AutoProcessor read them back. Each file is written
        under a temporary name and renamed into place, so a failure never leaves a half-written file."""
        return save_processor(self, folder)


def _count_markers(text: str, marker: str) -> int:
    """Occurrences of a media marker, leaving out those marked as user text (sanitize_control_tokens=True)."""
    return text.count(marker) - text.count(CONTROL_TOKEN_START + marker + CONTROL_TOKEN_END)


def _looks_like_text(images: Any) -> bool:
    candidates = [images] if isinstance(images, str) else images if isinstance(images, list) else []
    # A path that is there (a file, or a FIFO or device the image loader will refuse by name) is no text.
    return bool(candidates) and all(isinstance(c, str) and not os.path.lexists(c) for c in candidates)


def _audio_list(audio: Any) -> list:
    if isinstance(audio, (str, os.PathLike)) or (isinstance(audio, np.ndarray) and audio.ndim == 1):
        return [audio]
    if isinstance(audio, np.ndarray):
        raise ValueError(
            f"audio: expected a 1-D mono waveform or a list of them, got an array of shape {audio.shape}; "
            "downmix several channels with x.mean(axis=channel_axis) or load_audio(path, downmix=True)"
        )
    if isinstance(audio, (list, tuple)) and audio and all(isinstance(x, (int, float, np.number)) for x in audio):
        return [np.asarray(audio)]
    return list(audio)


def _route_kwargs(flat: dict, text: dict | None, images: dict | None, videos: dict | None, audio: dict | None) -> dict:
    """transformers' rule: a flat keyword goes to every modality that accepts it; per-modality dicts too,
    and the same keyword in both places is an error."""
    merged = {"text": dict(text or {}), "images": dict(images or {}), "videos": dict(videos or {}),
              "audio": dict(audio or {})}
    keys = {"text": _TEXT_KEYS, "images": _IMAGE_KEYS, "videos": _VIDEO_KEYS, "audio": _AUDIO_KEYS}
    for key, value in flat.items():
        targets = [m for m, allowed in keys.items() if key in allowed]
        if not targets:
            raise TypeError(f"Processor: unexpected keyword argument {key!r}")
        for modality in targets:
            if key in merged[modality]:
                raise ValueError(f"keyword {key!r} was passed twice: in {modality}_kwargs and as a keyword")
            merged[modality][key] = value
    return merged


def _cut_after_final_message(prompt: str, message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        texts = [b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"]
        content = texts[-1] if texts else ""
    content = (content or "").strip()
    at = prompt.rfind(content) if content else -1
    if at < 0:
        raise ValueError("continue_final_message: the final message's text was not found in the rendered prompt")
    return prompt[: at + len(content)]
