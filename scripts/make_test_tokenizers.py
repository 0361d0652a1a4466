"""Build the small test tokenizers used by the processing tests and the bundled tiny checkpoint.

    python scripts/make_test_tokenizers.py            # writes gemma4_eqx/assets/tiny/ (beside the bundled checkpoint)

(a) `tiny_tokenizer`: a byte-fallback BPE (vocab 1024) trained on the English text below, with the
    same pipeline as transformers' `GemmaTokenizer` (spaces -> "▁", split after spaces, byte fallback)
    so that transformers and the `tokenizers` library tokenize it identically. Special tokens sit at
    the real Gemma 4 ids below 107, and the multimodal ones follow the rule of the project's small
    checkpoints: for vocab V, `<|image>` V-7, `<|audio>` V-6, `<|image|>` V-5, `<|audio|>` V-4,
    `<image|>` V-3, `<audio|>` V-2, `<|video|>` V-1. Its post-processor prepends `<bos>`.
(b) `build_real_id_tokenizer()`: a tokenizer with the real Gemma 4 ids (vocab 262144 of filler
    tokens plus the special tokens of spec processors.md §4). It is built at test time, never stored.

The tokenizer is deterministic for a given `tokenizers` version; the stored copy is what tests use.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "gemma4_eqx" / "assets" / "tiny"
TEMPLATE = REPO / "gemma4_eqx" / "processing" / "chat_template.jinja"

# Ids that do not depend on the vocabulary size (the real Gemma 4 ids).
FIXED_SPECIALS = {
    "<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4,
    "<|tool>": 46, "<tool|>": 47, "<|tool_call>": 48, "<tool_call|>": 49,
    "<|tool_response>": 50, "<tool_response|>": 51, '<|"|>': 52,
    "<|think|>": 98, "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106,
}
# Offsets from the end of the vocabulary (small checkpoints).
TAIL_SPECIALS = {"<|image>": 7, "<|audio>": 6, "<|image|>": 5, "<|audio|>": 4, "<image|>": 3, "<audio|>": 2, "<|video|>": 1}
# The real Gemma 4 multimodal ids (spec §4).
REAL_MM_SPECIALS = {
    "<|image>": 255999, "<|audio>": 256000, "<|image|>": 258880, "<|audio|>": 258881,
    "<image|>": 258882, "<audio|>": 258883, "<|video|>": 258884,
}
REAL_VOCAB_SIZE = 262144

# Attribute names of the real tokenizer_config.json (spec §4).
CONFIG_TOKENS = {
    "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
    "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "std_token": "<|tool>", "etd_token": "<tool|>",
    "stc_token": "<|tool_call>", "etc_token": "<tool_call|>", "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "escape_token": '<|"|>',
}

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model reads text, images, audio and video.
What is shown in this picture? The picture shows a red house next to a green tree under a blue sky.
Describe the image in detail. There are two cats sitting on a wooden table near the open window.
Please transcribe the audio. The speaker says that the weather will be sunny and warm tomorrow.
What happens in this video? A person walks along the beach, stops, and looks at the sea.
The model answers questions about what it sees and hears, one turn after another.
You are a helpful assistant. Answer briefly and politely, and think step by step when asked.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Write a short poem about the moon. The moon is bright tonight, a silver coin in the dark.
Count from one to ten: one, two, three, four, five, six, seven, eight, nine, ten.
The numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in tables, dates and times like 00:05.
Time stamps such as 00:00, 00:01, 00:09 and 01:30 mark the frames of a video clip.
Large language models are trained on text from books, articles and conversations.
The image processor resizes every picture so that its sides are multiples of forty eight pixels.
Each patch of the image becomes a soft token, and the tokens are placed between markers.
The audio is cut into frames of forty milliseconds; every frame becomes one audio token.
A video is sampled into thirty two frames, and each frame is treated like a small image.
She opened the door, turned on the light, and found the letter on the kitchen table.
They travelled by train through mountains, forests and quiet villages to reach the city.
Water boils at one hundred degrees, and ice melts when the temperature rises above zero.
The children played in the garden while their parents prepared dinner in the house.
Science explains the world with observations, experiments and careful reasoning.
Music, painting and poetry are ways in which people share what they feel and imagine.
The library was quiet; only the sound of pages turning could be heard in the large room.
If the answer is not known, say so honestly instead of guessing a wrong answer.
Tools can be called by the model; the result of each call is returned in a tool response.
The function get_weather takes a city name and returns the temperature and the sky.
Translate the sentence into French, German and Spanish, then explain the grammar.
def add(a, b): return a + b  # a tiny function written in the Python language
{"name": "value", "list": [1, 2, 3], "flag": true}  (brackets, quotes, colons, commas)
Questions? Answers! Lists: first, second, third. Quotes: "yes" and 'no'. Dash - and slash /.
"""


def _gemma_pipeline(tok: Tokenizer) -> None:
    """Normalizer, pre-tokenizer and decoder exactly as transformers' `GemmaTokenizer` builds them."""
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def _bos_post_processor(bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single="<bos>:0 $A:0", pair="<bos>:0 $A:0 <bos>:1 $B:1", special_tokens=[("<bos>", bos_id)]
    )


def special_ids(vocab_size: int, real_mm_ids: bool = False) -> dict[str, int]:
    tail = REAL_MM_SPECIALS if real_mm_ids else {t: vocab_size - k for t, k in TAIL_SPECIALS.items()}
    return {**FIXED_SPECIALS, **tail}


def build_tiny_tokenizer(vocab_size: int = 1024, corpus: str = CORPUS) -> Tokenizer:
    """The BPE of (a), trained on `corpus` (default: the English text above; the small trained checkpoint passes
    its own corpus, scripts/train_small_checkpoint.py)."""
    specials = special_ids(vocab_size)
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_learned = vocab_size - len(specials) - len(byte_tokens)

    # Train a plain BPE on the corpus with the Gemma pre-processing; its tokens fill the free ids.
    trainer_tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=True, fuse_unk=True))
    _gemma_pipeline(trainer_tok)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(corpus.splitlines(keepends=True), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    learned = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    learned = [t for t, _ in learned if t not in specials and t not in byte_tokens][:n_learned]

    free_ids = iter(i for i in range(vocab_size) if i not in set(specials.values()))
    vocab = dict(specials)
    for token in byte_tokens + learned:
        vocab[token] = next(free_ids)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    _gemma_pipeline(tok)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    tok.post_processor = _bos_post_processor(specials["<bos>"])
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    for token, idx in specials.items():
        assert tok.token_to_id(token) == idx, (token, idx, tok.token_to_id(token))
    return tok


def build_real_id_tokenizer() -> Tokenizer:
    """A word-level tokenizer with the real Gemma 4 special-token ids and vocab size 262144.

    Regular ids are filler tokens ("<filler_N>") except a few plain words, so prompts made of
    markers, spaces and these words tokenize; anything else maps to `<unk>`.
    """
    specials = special_ids(REAL_VOCAB_SIZE, real_mm_ids=True)
    taken = set(specials.values())
    words = ["▁", "\n", "00:00", ":", "▁What", "▁is", "▁shown", "?", "What", "Describe", "user", "model", "system", "thought"]
    vocab = dict(specials)
    free = (i for i in range(REAL_VOCAB_SIZE) if i not in taken)
    for w in words:
        vocab[w] = next(free)
    for i in free:
        vocab[f"<filler_{i}>"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.post_processor = _bos_post_processor(specials["<bos>"])
    return tok


def tokenizer_config(padding_side: str = "left") -> dict:
    return {
        "tokenizer_class": "GemmaTokenizer",
        "padding_side": padding_side,
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
        **CONFIG_TOKENS,
        "extra_special_tokens": ["<|video|>"],
        "model_max_length": 1000000000000000019884624838656,
        "clean_up_tokenization_spaces": False,
    }


def processor_config() -> dict:
    """Like google/gemma-4-12B-it's processor_config.json (spec §0)."""
    vision = {
        "patch_size": 16, "pooling_kernel_size": 3, "resample": 3, "do_resize": True,
        "do_rescale": True, "rescale_factor": 0.00392156862745098, "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0], "do_convert_rgb": True,
    }
    return {
        "processor_class": "Gemma4UnifiedProcessor",
        "image_seq_length": 280,
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "image_processor": {
            "image_processor_type": "Gemma4UnifiedImageProcessor", **vision,
            "max_soft_tokens": 280, "do_normalize": False,
        },
        "video_processor": {
            "video_processor_type": "Gemma4UnifiedVideoProcessor", **vision,
            "max_soft_tokens": 70, "num_frames": 32, "do_sample_frames": True, "do_normalize": True,
            "return_metadata": False,
        },
        "feature_extractor": {
            "feature_extractor_type": "Gemma4UnifiedAudioFeatureExtractor", "feature_size": 640,
            "audio_samples_per_token": 640, "sampling_rate": 16000, "padding_value": 0.0,
            "padding_side": "right", "return_attention_mask": True,
        },
    }


def save_folder(tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "processor_config.json").write_text(json.dumps(processor_config(), indent=2) + "\n")
    shutil.copyfile(TEMPLATE, out / "chat_template.jinja")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    tok = build_tiny_tokenizer()
    save_folder(tok, args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1024:.0f} KB)")
    print(tok.encode("<|turn>user\nWhat is shown?<|image|><turn|>\n").tokens)


if __name__ == "__main__":
    main()
