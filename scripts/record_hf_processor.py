"""Record reference outputs of transformers' own Gemma 4 Unified processors for the processing tests.

Runs in the torchvision venv (never in the package's venv):

    python3.11 -m venv .venv-tv
    .venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 transformers==5.24.0 pillow numpy tokenizers jinja2
    .venv-tv/bin/python scripts/record_hf_processor.py

Inputs are generated here from seeded RNGs and stored next to the outputs in tests/fixtures/processor/
(images.npz, media.npz, prompts.json, ...), so the tests need neither torch nor transformers.
To stay small, pixel values are stored as uint8 images (the resized image each patch grid comes from):
this script checks that transformers' pixel_values are exactly that image rescaled and cut into
48-px patches, so the tests can rebuild the exact float32 values.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from transformers import AutoProcessor

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "gemma4_eqx" / "assets" / "tiny"
OUT = REPO / "tests" / "fixtures" / "processor"
PATCH = 48


# ----------------------------------------------------------------------------- inputs
def structured_image(h: int, w: int, seed: int) -> np.ndarray:
    """Gradients, block noise, a patch of fine noise and sharp lines: varied, yet compressible."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    block = max(4, min(h, w) // 24)
    coarse = rng.integers(0, 256, (h // block + 1, w // block + 1, 3))
    img = coarse[yy // block, xx // block] // 2
    img = img + np.stack([xx * 127 // max(w - 1, 1), yy * 127 // max(h - 1, 1), (xx + yy) % 128], -1)
    y0, x0 = h // 3, w // 3
    img[y0:y0 + h // 5, x0:x0 + w // 5] = rng.integers(0, 256, img[y0:y0 + h // 5, x0:x0 + w // 5].shape)
    img[:, w // 7 :: max(1, w // 5)] = 255
    img[h // 9 :: max(1, h // 4), :] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def noise_image(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def make_images() -> dict[str, np.ndarray]:
    images = {
        "pil_1x1": noise_image(1, 1, 1),  # PIL: transformers reads a (1, 1, 3) array as channels-first
        "224x224": noise_image(224, 224, 2),
        "480x640": structured_image(480, 640, 3),
        "1080x1920": structured_image(1080, 1920, 4),
        "10x2000": structured_image(10, 2000, 5),
        "500x30": structured_image(500, 30, 6),
        "gray_300x200": structured_image(300, 200, 7)[..., 0],  # given as a PIL "L" image
        "rgba_200x300": np.concatenate([structured_image(200, 300, 8), structured_image(200, 300, 9)[..., 1:2]], -1),
        "np_gray_120x90": structured_image(120, 90, 10)[..., :1],  # numpy (H, W, 1)
        "np_rgba_90x120": np.concatenate([structured_image(90, 120, 11), structured_image(90, 120, 12)[..., 2:]], -1),
    }
    return images


def as_input(name: str, array: np.ndarray):
    """How each stored array is handed to the processors (the tests do the same)."""
    if name.startswith("gray_"):
        return PIL.Image.fromarray(array, mode="L")
    if name.startswith("rgba_"):
        return PIL.Image.fromarray(array, mode="RGBA")
    if name.startswith("pil_"):
        return PIL.Image.fromarray(array, mode="RGB")
    return array


# ----------------------------------------------------------------------------- checks
def unpatchify(pixel_values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Valid rows of [S, 48*48*3] back to the (H, W, 3) image, asserting raster order of (x, y)."""
    valid = positions[:, 0] >= 0
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any(), "real patches must come first"
    assert (pixel_values[n:] == 0).all() and (positions[n:] == -1).all(), "padding must be zeros at (-1, -1)"
    cols = int(positions[:n, 0].max()) + 1
    rows = n // cols
    expected = np.stack(np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy"), -1).reshape(-1, 2)
    assert (positions[:n] == expected).all(), "positions must be (x, y) in raster order"
    blocks = pixel_values[:n].reshape(rows, cols, PATCH, PATCH, 3)
    return blocks.transpose(0, 2, 1, 3, 4).reshape(rows * PATCH, cols * PATCH, 3)


def to_uint8_exact(x: np.ndarray, divide: bool) -> np.ndarray:
    """uint8 u with x == float32(u) * float32(1/255) (images) or float32(u) / 255 (video), checked bitwise."""
    u = np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)
    back = u.astype(np.float32) / np.float32(255.0) if divide else u.astype(np.float32) * np.float32(1 / 255)
    assert np.array_equal(back.view(np.uint32), x.astype(np.float32).view(np.uint32)), "not an exact uint8 grid"
    return u


def png_bytes(image: np.ndarray) -> np.ndarray:
    """Lossless PNG bytes as a uint8 array (smaller than zlib for smooth resized images)."""
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG", compress_level=9)
    return np.frombuffer(buf.getvalue(), dtype=np.uint8)


def sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- recording
def record_images(proc, images: dict[str, np.ndarray]) -> tuple[dict, dict]:
    arrays, cases = {}, []
    plan = [(name, 280) for name in images] + [(n, 70) for n in ("pil_1x1", "480x640", "1080x1920", "500x30", "10x2000")]
    plan += [(n, 1120) for n in ("pil_1x1", "480x640", "10x2000", "rgba_200x300")]
    for name, s in plan:
        out = proc.image_processor(as_input(name, images[name]), max_soft_tokens=s, return_tensors="np")
        pv, pos = out["pixel_values"][0], out["image_position_ids"][0]
        assert pv.shape == (s, PATCH * PATCH * 3) and pv.dtype == np.float32 and pos.dtype == np.int64
        resized = to_uint8_exact(unpatchify(pv, pos), divide=False)
        key = f"{name}@{s}"
        arrays[f"resized_png/{key}"] = png_bytes(resized)
        arrays[f"positions/{key}"] = pos
        cases.append({"key": key, "image": name, "max_soft_tokens": s,
                      "num_soft_tokens": int(out["num_soft_tokens_per_image"][0]), "resized_shape": list(resized.shape)})
    # A batch of several images in one call: same rows as one by one.
    names = ["224x224", "gray_300x200", "500x30"]
    out = proc.image_processor([as_input(n, images[n]) for n in names], return_tensors="np")
    for i, n in enumerate(names):
        assert np.array_equal(unpatchify(out["pixel_values"][i], out["image_position_ids"][i]),
                              unpatchify(*[proc.image_processor(as_input(n, images[n]), return_tensors="np")[k][0]
                                           for k in ("pixel_values", "image_position_ids")]))
    return arrays, {"image_cases": cases, "image_batch": names}


def record_audio(proc) -> tuple[dict, dict]:
    rng = np.random.default_rng(20)
    lengths = [1, 640, 641, 16000, 40000]
    clips = [(rng.standard_normal(n) * 0.3).astype(np.float32) for n in lengths]
    arrays = {f"audio/{n}": c for n, c in zip(lengths, clips)}
    cases = []
    for n, clip in zip(lengths, clips):
        out = proc.feature_extractor(clip, return_tensors="np")
        arrays[f"audio_features/{n}"] = out["input_features"]
        arrays[f"audio_mask/{n}"] = out["input_features_mask"]
        cases.append({"samples": n, "frames": int(out["input_features_mask"].sum())})
    out = proc.feature_extractor(clips, return_tensors="np")
    arrays["audio_batch_features"] = out["input_features"]
    arrays["audio_batch_mask"] = out["input_features_mask"]
    empty = proc.feature_extractor([np.zeros(0, np.float32)], return_tensors="np")
    return arrays, {"audio_cases": cases, "audio_batch": lengths,
                    "audio_empty_shape": list(empty["input_features"].shape)}


def make_video(frames: int, h: int, w: int, seed: int) -> np.ndarray:
    base = structured_image(h, w, seed)
    shifts = np.random.default_rng(seed).integers(0, 7, (frames, 2))
    return np.stack([np.roll(base, tuple(s), axis=(0, 1)) for s in shifts])


def record_video(proc) -> tuple[dict, dict]:
    videos = {"v40": make_video(40, 120, 160, 30), "v300": make_video(300, 54, 96, 31),
              "v5": make_video(5, 64, 48, 32), "v3": make_video(3, 30, 200, 33)}
    arrays = {f"video/{k}": v for k, v in videos.items()}
    info = {}
    calls = {
        "v40_fps10": dict(videos=[videos["v40"]], video_metadata=[{"fps": 10.0, "total_num_frames": 40}]),
        "v300_fps30": dict(videos=[videos["v300"]], video_metadata=[{"fps": 30.0, "total_num_frames": 300}]),
        "v5_v3_unsampled": dict(videos=[videos["v5"], videos["v3"]], do_sample_frames=False,
                                video_metadata=[{"fps": 2.0, "total_num_frames": 5}, {"fps": 1.0, "total_num_frames": 3}]),
    }
    for name, kwargs in calls.items():
        out = proc.video_processor(return_tensors="np", return_metadata=True, **kwargs)
        pv, pos = out["pixel_values_videos"], out["video_position_ids"]
        frames = [to_uint8_exact(unpatchify(pv[t], pos[t]), divide=True) for t in range(pv.shape[0])]
        arrays[f"video_positions/{name}"] = pos
        for t in sorted({0, 1, len(frames) - 1}):
            arrays[f"video_frame_png/{name}/{t}"] = png_bytes(frames[t])
        info[name] = {
            "num_frames_per_video": [int(x) for x in out["num_frames_per_video"]],
            "num_soft_tokens_per_video": [int(x) for x in out["num_soft_tokens_per_video"]],
            "frames_indices": [None if m.frames_indices is None else [int(i) for i in m.frames_indices]
                               for m in out["video_metadata"]],
            "timestamps": [None if m.frames_indices is None else list(map(float, m.timestamps))
                           for m in out["video_metadata"]],
            "frames_sha256": sha(np.concatenate([f.reshape(-1) for f in frames])),
            "pixel_values_videos_shape": list(pv.shape),
        }
    return arrays, {"video_cases": info}


def record_prompts(proc, images: dict, media: dict) -> dict:
    """Full processor calls; every case lists its inputs by name so the tests can replay them."""
    img = lambda n: as_input(n, images[n])  # noqa: E731
    cases = {
        "one_image": dict(text=["<|turn>user\n<|image|>What is shown?<turn|>\n<|turn>model\n"], images=[["480x640"]]),
        "two_images": dict(text=["<|image|> and <|image|>: what differs?"], images=[["224x224", "gray_300x200"]]),
        "batch_different_counts": dict(
            text=["<|image|>Describe the image.", "Compare <|image|> with <|image|> please", "<|image|><|image|><|image|>"],
            images=[["pil_1x1"], ["500x30", "rgba_200x300"], ["10x2000", "np_gray_120x90", "np_rgba_90x120"]]),
        "images_no_text": dict(text=None, images=[["224x224", "pil_1x1"]]),
        "max_soft_tokens_70": dict(text=["<|image|> small"], images=[["1080x1920"]], images_kwargs={"max_soft_tokens": 70}),
        "audio": dict(text=["Transcribe: <|audio|>"], audio=["audio/16000"]),
        "audio_batch": dict(text=["<|audio|> first", "second <|audio|> then <|audio|>"],
                            audio=["audio/641", "audio/1", "audio/40000"]),
        "video": dict(text=["<|video|> What happens?"], videos=["video/v40"], video_metadata=[{"fps": 10.0, "total_num_frames": 40}]),
        "video_30fps": dict(text=["Watch <|video|>"], videos=["video/v300"], video_metadata=[{"fps": 30.0, "total_num_frames": 300}]),
        "everything": dict(
            text=["<|image|> and <|audio|> and <|video|>", "just text, padded on the left"],
            images=[["480x640"], []], audio=["audio/640"], videos=["video/v40"],
            video_metadata=[{"fps": 25.0, "total_num_frames": 40}]),
        "text_only_batch": dict(text=["short", "a much longer line of text that needs no padding at all", ""]),
    }
    results = {}
    for name, case in cases.items():
        kwargs = {"return_tensors": "np"}
        if case.get("text") is not None:
            kwargs["text"] = case["text"]
        if "images" in case:
            kwargs["images"] = [[img(n) for n in sample] for sample in case["images"]]
        if "audio" in case:
            kwargs["audio"] = [media[n] for n in case["audio"]]
        if "videos" in case:
            kwargs["videos"] = [media[n] for n in case["videos"]]
            kwargs["video_metadata"] = case["video_metadata"]
        if "images_kwargs" in case:
            kwargs["images_kwargs"] = case["images_kwargs"]
        try:
            out = proc(**kwargs)
        except Exception as err:  # recorded: transformers refuses this input
            results[name] = {"inputs": case, "error": f"{type(err).__name__}: {err}"}
            continue
        results[name] = {"inputs": case, "outputs": summarize(out)}
    return results


def summarize(out) -> dict:
    res = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in out:
            res[key] = np.asarray(out[key]).tolist()
    for key in ("image_position_ids", "video_position_ids"):
        if key in out:
            res[key + "_sha256"] = sha(np.asarray(out[key], dtype=np.int64))
            res[key + "_shape"] = list(np.asarray(out[key]).shape)
    for key in ("pixel_values", "pixel_values_videos", "input_features"):
        if key in out:
            res[key + "_shape"] = list(np.asarray(out[key]).shape)
            res[key + "_sha256"] = sha(np.asarray(out[key], dtype=np.float32))
    if "input_features_mask" in out:
        res["input_features_mask"] = np.asarray(out["input_features_mask"]).tolist()
    if "num_frames_per_video" in out:
        res["num_frames_per_video"] = [int(x) for x in out["num_frames_per_video"]]
    res["keys"] = sorted(out.keys())
    return res


def record_chat(proc, images: dict) -> dict:
    conversations = {
        "one_image": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}],
        "system_multi_turn": [
            {"role": "system", "content": "  You are terse.  "},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<|channel>thought\nsecret<channel|>Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "Listen"}, {"type": "audio"}, {"type": "video"}]},
        ],
        "text_only": [{"role": "user", "content": "  Count to three.\n"}],
    }
    variants = {"plain": {}, "gen": {"add_generation_prompt": True},
                "gen_thinking": {"add_generation_prompt": True, "enable_thinking": True}}
    out = {}
    for cname, conv in conversations.items():
        for vname, kw in variants.items():
            out[f"{cname}/{vname}"] = {"conversation": conv, "kwargs": kw,
                                       "prompt": proc.apply_chat_template(conv, **kw)}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    conv = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "name": "get_weather", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."}]
    out["tools/gen"] = {"conversation": conv, "kwargs": {"add_generation_prompt": True}, "tools": tools,
                        "prompt": proc.apply_chat_template(conv, tools=tools, add_generation_prompt=True)}
    # Tokenized through transformers' apply_chat_template with an image in the content.
    conv = [{"role": "user", "content": [{"type": "image", "image": images["224x224"]}, {"type": "text", "text": "Describe."}]}]
    res = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="np")
    out["tokenized/one_image"] = {"image": "224x224", "outputs": summarize(res)}
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    proc = AutoProcessor.from_pretrained(TOKENIZER_DIR)
    images = make_images()
    meta = {"transformers": transformers.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}
    image_arrays, image_meta = record_images(proc, images)
    audio_arrays, audio_meta = record_audio(proc)
    video_arrays, video_meta = record_video(proc)
    media = {**audio_arrays, **video_arrays}
    np.savez_compressed(OUT / "inputs.npz", **{f"image/{k}": v for k, v in images.items()},
                        **{k: v for k, v in media.items() if k.startswith(("audio/", "video/"))})
    np.savez_compressed(OUT / "images.npz", **image_arrays)
    np.savez_compressed(OUT / "audio.npz", **{k: v for k, v in audio_arrays.items() if not k.startswith("audio/")})
    np.savez_compressed(OUT / "video.npz", **{k: v for k, v in video_arrays.items() if not k.startswith("video/")})
    cases = {"versions": meta, **image_meta, **audio_meta, **video_meta,
             "prompts": record_prompts(proc, images, media), "chat": record_chat(proc, images)}
    (OUT / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    for p in sorted(OUT.iterdir()):
        print(f"{p.name}: {p.stat().st_size / 1e6:.2f} MB")
    print(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
