"""Chat template and tokenizer: renderings recorded with transformers, special-token ids, BOS, padding."""

import json
import shutil
import sys

import numpy as np
import pytest
from processing_reference import REPO, TINY_TOKENIZER, cases, image_input, processing, processor

CHAT = cases()["chat"]
# The "chat" renderings of cases.json were transformers' renderings of the previous built-in template; the
# template now renders as Google's 12B-it one, which tests/test_chat_format.py holds against transformers
# (the same conversations included), so only the tokenized case is read here.


def test_tokenized_chat_matches_transformers():
    ref = CHAT["tokenized/one_image"]["outputs"]
    conv = [{"role": "user", "content": [{"type": "image", "image": image_input("224x224")},
                                         {"type": "text", "text": "Describe."}]}]
    out = processor().apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        assert out[key].tolist() == ref[key]
    assert list(out["pixel_values"].shape) == ref["pixel_values_shape"]


def test_thinking_switch_and_generation_prompt():
    conv = [{"role": "user", "content": "Hi"}]
    off = processor().apply_chat_template(conv, add_generation_prompt=True)
    on = processor().apply_chat_template(conv, add_generation_prompt=True, enable_thinking=True)
    assert off == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    assert on == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"


def test_media_markers_are_bare():
    conv = [{"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "image"}, {"type": "audio"},
                                         {"type": "video"}, {"type": "text", "text": " B "}]}]
    assert processor().apply_chat_template(conv) == "<bos><|turn>user\nA<|image|><|audio|><|video|>B<turn|>\n"


def test_batched_conversations():
    convs = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    prompts = processor().apply_chat_template(convs)
    assert prompts == ["<bos><|turn>user\na<turn|>\n", "<bos><|turn>user\nb<turn|>\n"]
    ids = processor().apply_chat_template(convs, tokenize=True)
    assert ids.shape[0] == 2


def test_continue_final_message():
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello the"}]
    prompt = processor().apply_chat_template(conv, continue_final_message=True)
    assert prompt.endswith("Hello the")


def test_folder_template_is_preferred(tmp_path):
    for f in TINY_TOKENIZER.iterdir():
        shutil.copy(f, tmp_path / f.name)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}custom{{ messages[0]['content'] }}")
    proc = processing.Processor.from_pretrained(tmp_path)
    assert proc.apply_chat_template([{"role": "user", "content": "x"}]) == "<bos>customx"
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.warns(UserWarning, match="has no chat template"):
        proc = processing.Processor.from_pretrained(tmp_path)
    assert proc.chat_template == processing.builtin_template()


def test_template_errors_are_raised():
    with pytest.raises(TypeError, match="conversation"):
        processor().apply_chat_template("hello")


# ----------------------------------------------------------------------------- tokenizer
def test_special_token_ids_from_the_tokenizer():
    tok = processor().tokenizer
    v = tok.vocab_size
    assert v == 1024
    expected = {"pad_token": 0, "eos_token": 1, "bos_token": 2, "unk_token": 3, "mask_token": 4,
                "std_token": 46, "etd_token": 47, "stc_token": 48, "etc_token": 49, "str_token": 50,
                "etr_token": 51, "escape_token": 52, "think_token": 98, "soc_token": 100, "eoc_token": 101,
                "sot_token": 105, "eot_token": 106, "boi_token": v - 7, "boa_token": v - 6, "image_token": v - 5,
                "audio_token": v - 4, "eoi_token": v - 3, "eoa_token": v - 2, "video_token": v - 1}
    assert {name: getattr(tok, name + "_id") for name in expected} == expected


def test_real_gemma_ids():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_test_tokenizers
    finally:
        sys.path.pop(0)
    backend = make_test_tokenizers.build_real_id_tokenizer()
    config = make_test_tokenizers.tokenizer_config()
    proc = processing.Processor(processing.Tokenizer(backend, config))
    assert (proc.boi_token_id, proc.image_token_id, proc.eoi_token_id) == (255999, 258880, 258882)
    assert (proc.boa_token_id, proc.audio_token_id, proc.eoa_token_id, proc.video_token_id) == (256000, 258881, 258883, 258884)
    out = proc(text=["<|image|>", "<|audio|>"], images=[[image_input("480x640")], []],
               audio=[np.zeros(1000, np.float32)])
    ids = out["input_ids"]
    assert (ids == 258880).sum() == 266 and (ids == 258881).sum() == 2
    assert out["mm_token_type_ids"][ids == 258880].tolist() == [1] * 266
    assert out["mm_token_type_ids"][ids == 255999].tolist() == [0]
    assert ids[0, 0] == 2 and ids[1].tolist().count(2) == 1


def test_padding_side_comes_from_the_config(tmp_path):
    for f in TINY_TOKENIZER.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["padding_side"] = "right"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = processing.Tokenizer.from_pretrained(tmp_path)
    out = tok(["a", "a longer text"], padding=True)
    assert out["attention_mask"][0, 0] == 1 and out["attention_mask"][0, -1] == 0


def test_decode_round_trip():
    tok = processor().tokenizer
    text = "<|turn>user\nHello, how are you?<turn|>"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.adds_bos()


def test_template_keywords_stay_with_the_template_and_the_rest_reach_the_processor():
    import warnings

    proc = processor()
    conv = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enable_thinking is read by the template: no warning, not sent on
        out = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       enable_thinking=True)
    assert out["input_ids"].shape[0] == 1
    with pytest.warns(UserWarning, match="prefer processor_kwargs"), pytest.raises(TypeError, match="no_such_option"):
        proc.apply_chat_template(conv, tokenize=True, no_such_option=1)  # neither template nor processor knows it
