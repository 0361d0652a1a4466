"""Hostile inputs to the processing side (issue 34): each is built in tmp_path, must end in the named error class with a
message naming the file / field / limit, and within its time bound (hostile chat templates: 5 s each).

One row per case: name -> (build(tmp_path) -> a call, expected error class, regex the message must match, seconds).
Nothing here compiles a model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings
from fractions import Fraction

import numpy as np
import pytest
from processing_reference import TINY_TOKENIZER, processing

from gemma4_eqx.processing import chat_parser
from gemma4_eqx.processing import video as video_module
from gemma4_eqx.processing.fields import ProcessorConfigError
from gemma4_eqx.processing.sandbox import TemplateBudgetError, TemplateLimits
from gemma4_eqx.utils import files
from gemma4_eqx.utils.files import FileMissingError, FileReadError

TEMPLATE_SECONDS = 5.0  # every hostile chat template must end within this
FAST = 2.0  # everything else here is far quicker


# ----------------------------------------------------------------------------- helpers
def folder(tmp_path, **replace):
    """A copy of the tiny processor folder; `replace` maps a file name to text, bytes, a callable(path) that makes
    it (a FIFO, a directory, ...), or None to leave it out."""
    out = tmp_path / "proc"
    out.mkdir(exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        if name not in replace:
            shutil.copy(TINY_TOKENIZER / name, out / name)
    for name, content in replace.items():
        path = out / name
        if content is None:
            continue
        if callable(content):
            content(path)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return out


def processor_config(**sections):
    """The tiny processor_config.json with `sections` merged in (a non-empty dict merges into that section, anything
    else, {} included, replaces it)."""
    config = json.loads((TINY_TOKENIZER / "processor_config.json").read_text())
    for key, value in sections.items():
        if isinstance(value, dict) and value and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return json.dumps(config)


def fifo(path):
    os.mkfifo(path)


def directory(path):
    path.mkdir()


def unix_socket(path):
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock  # kept open by the caller's closure below


def sparse(size):
    """A file of `size` bytes that takes no disk (and no time) to make."""
    def make(path):
        with open(path, "wb") as f:
            f.truncate(size)
    return make


def load(tmp_path, **replace):
    return lambda: processing.Processor.from_pretrained(folder(tmp_path, **replace))


def write_video(path, frames: np.ndarray, fps: int = 30, codec: str = "ffv1") -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps, 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def render(template: str):
    return lambda: processing.render_chat_template(template, [{"role": "user", "content": "hi"}],
                                                   template_name="hostile.jinja")


# ----------------------------------------------------------------------------- 1. utils.files
def _files_cases():
    def read(build, **kwargs):
        def make(tmp_path):
            path = tmp_path / "f"
            kept = build(path)
            return lambda: (kept, files.read_bytes(path, kwargs.pop("max_bytes", 1 << 20), "a test file"))
        return make

    def read_json(content, **kwargs):
        def make(tmp_path):
            path = tmp_path / "f.json"
            path.write_text(content)
            return lambda: files.read_json(path, 1 << 20, **kwargs)
        return make

    def symlink_to(build):
        def make(path):
            target = path.with_name("target")
            kept = build(target)
            os.symlink(target, path)
            return kept
        return make

    return {
        "files: a FIFO": (read(fifo), FileReadError, r"/f: not a regular file, it is a FIFO \(named pipe\)"),
        "files: a directory": (read(directory), FileReadError, r"/f: not a regular file, it is a directory"),
        "files: a socket": (read(unix_socket), FileReadError, r"/f: not a regular file, it is a socket"),
        "files: a character device": (lambda tmp_path: lambda: files.read_bytes(os.devnull, 10), FileReadError,
                                      f"{os.devnull}: not a regular file, it is a character device"),
        "files: a symlink to a FIFO": (read(symlink_to(fifo)), FileReadError, r"/f: not a regular file, it is a FIFO"),
        "files: a symlink loop": (read(lambda p: os.symlink(p, p)), FileReadError, r"/f: too many levels of symbolic"),
        "files: missing": (read(lambda p: None), FileMissingError, r"/f: no such file; expected a test file"),
        "files: larger than the limit": (read(sparse(10 << 20)), FileReadError,
                                         r"/f: 10,485,760 bytes \(10.0 MiB\), more than the limit of 1,048,576 bytes"),
        "files: invalid UTF-8": (lambda tmp_path: ((tmp_path / "t").write_bytes(b"ok\n\xc3\x28 rest"),
                                                   lambda: files.read_text(tmp_path / "t", 100))[1],
                                 FileReadError, r"/t: not valid UTF-8 at byte offset 3"),
        "files: invalid JSON": (read_json('{"a": 1,\n "b": }'), FileReadError,
                                r"f.json: not valid JSON: Expecting value at line 2 column 7"),
        "files: JSON 100k deep": (read_json("[" * 100_000 + "]" * 100_000), FileReadError,
                                  r"f.json: JSON nested deeper than the limit of 256 levels"),
        "files: JSON 300 deep": (read_json("[" * 300 + "]" * 300), FileReadError, r"deeper than the limit of 256"),
        "files: JSON of the wrong type": (read_json("[1, 2]", expect=dict), FileReadError,
                                          r"f.json: expected a JSON object, found a list"),
    }


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "blob").write_text('{"a": 1}')
    os.symlink(tmp_path / "blob", tmp_path / "link.json")  # the Hugging Face cache is symlinks into blobs/
    assert files.read_json(tmp_path / "link.json", 100, expect=dict) == {"a": 1}


def test_a_fifo_does_not_block_the_open(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    start = time.monotonic()
    with pytest.raises(FileReadError, match="FIFO"):
        files.open_regular(tmp_path / "pipe")
    assert time.monotonic() - start < FAST


# ----------------------------------------------------------------------------- 2. + 7. processing's readers
def _reader_cases():
    def image(build):
        def make(tmp_path):
            path = tmp_path / "img.png"
            kept = build(path)
            return lambda: (kept, processing.load_image(path))
        return make

    def audio_file(build):
        def make(tmp_path):
            path = tmp_path / "a.wav"
            kept = build(path)
            return lambda: (kept, processing.load_audio(path))
        return make

    def empty_wav(path):
        import soundfile

        soundfile.write(path, np.zeros(0, np.float32), 16000)

    return {
        "image: /dev/zero-like device": (lambda tmp_path: lambda: processing.load_image(os.devnull), FileReadError,
                                         f"{os.devnull}: not a regular file, it is a character device; expected an "
                                         "image file"),
        "image: a FIFO": (image(fifo), FileReadError, r"img.png: not a regular file, it is a FIFO"),
        "image: a directory": (image(directory), FileReadError, r"img.png: not a regular file, it is a directory"),
        "image: too large": (image(sparse(300 << 20)), FileReadError, r"img.png: .* more than the limit of .* for an "
                                                                        r"image file"),
        "image: not an image": (image(lambda p: p.write_bytes(b"GIF89a junk")), ValueError,
                                r"img.png: not a readable image"),
        "image: a device through the processor call": (
            lambda tmp_path: lambda: processing.Processor.from_pretrained(TINY_TOKENIZER)(images=os.devnull),
            FileReadError, "not a regular file, it is a character device"),
        "audio: no samples": (audio_file(empty_wav), ValueError, r"a.wav: the audio file holds no samples"),
        "audio: a FIFO": (audio_file(fifo), FileReadError, r"a.wav: not a regular file, it is a FIFO"),
        "audio: not audio": (audio_file(lambda p: p.write_bytes(b"RIFF junk")), ValueError,
                             r"a.wav: not a readable audio file"),
        "video: a FIFO": (lambda tmp_path: (fifo(tmp_path / "v.mkv"), lambda: processing.load_video(tmp_path / "v.mkv"))[1],
                          FileReadError, r"v.mkv: not a regular file, it is a FIFO"),
        "video: a directory": (lambda tmp_path: (directory(tmp_path / "v.mkv"),
                                                 lambda: processing.load_video(tmp_path / "v.mkv"))[1],
                               FileReadError, r"v.mkv: not a regular file, it is a directory"),
        "processor_config.json a FIFO": (lambda tmp_path: load(tmp_path, **{"processor_config.json": fifo}),
                                         FileReadError, r"processor_config.json: not a regular file, it is a FIFO"),
        "processor_config.json invalid JSON": (lambda tmp_path: load(tmp_path, **{"processor_config.json": "{oops"}),
                                               FileReadError, r"processor_config.json: not valid JSON: .* line 1"),
        "processor_config.json too large": (lambda tmp_path: load(tmp_path, **{"processor_config.json": sparse(9 << 20)}),
                                            FileReadError, r"processor_config.json: 9,437,184 bytes .* more than the "
                                                           r"limit of 8,388,608 bytes"),
        "preprocessor_config.json a directory": (
            lambda tmp_path: load(tmp_path, **{"processor_config.json": processor_config(image_processor={}),
                                               "preprocessor_config.json": directory}),
            FileReadError, r"preprocessor_config.json: not a regular file, it is a directory"),
        "tokenizer.json a FIFO": (lambda tmp_path: load(tmp_path, **{"tokenizer.json": fifo}), FileReadError,
                                  r"tokenizer.json: not a regular file, it is a FIFO"),
        "tokenizer.json too large": (lambda tmp_path: load(tmp_path, **{"tokenizer.json": sparse(200 << 20)}),
                                     FileReadError, r"tokenizer.json: 209,715,200 bytes .* more than the limit of "
                                                    r"134,217,728 bytes"),
        "tokenizer_config.json 100k deep": (
            lambda tmp_path: load(tmp_path, **{"tokenizer_config.json": "[" * 100_000 + "]" * 100_000}),
            FileReadError, r"tokenizer_config.json: JSON nested deeper than the limit of 256 levels"),
        "tokenizer_config.json a list": (lambda tmp_path: load(tmp_path, **{"tokenizer_config.json": "[]"}),
                                         FileReadError, r"tokenizer_config.json: expected a JSON object, found a list"),
        "chat_template.jinja not UTF-8": (lambda tmp_path: load(tmp_path, **{"chat_template.jinja": b"{{ x }}\xff"}),
                                          FileReadError, r"chat_template.jinja: not valid UTF-8 at byte offset 7"),
        "chat_template.jinja a directory": (lambda tmp_path: load(tmp_path, **{"chat_template.jinja": directory}),
                                            FileReadError, r"chat_template.jinja: not a regular file, it is a directory"),
        "chat_template.jinja too large": (lambda tmp_path: load(tmp_path, **{"chat_template.jinja": sparse(2 << 20)}),
                                          FileReadError, r"chat_template.jinja: 2,097,152 bytes .* more than the limit "
                                                         r"of 1,048,576 bytes"),
        "chat_template.json invalid JSON": (
            lambda tmp_path: load(tmp_path, **{"chat_template.jinja": None, "chat_template.json": '{"chat_template": '}),
            FileReadError, r"chat_template.json: not valid JSON"),
        "chat_template.json a list": (
            lambda tmp_path: load(tmp_path, **{"chat_template.jinja": None, "chat_template.json": '["{{ x }}"]'}),
            FileReadError, r"chat_template.json: expected a JSON object, found a list"),
        "chat_template.json a number template": (
            lambda tmp_path: load(tmp_path, **{"chat_template.jinja": None, "chat_template.json": '{"chat_template": 7}'}),
            FileReadError, r"chat_template.json: chat_template must be a template string.*found a number"),
        "tokenizer_config.json chat_template list of junk": (
            lambda tmp_path: load(tmp_path, **{"chat_template.jinja": None, "tokenizer_config.json": json.dumps(
                {**json.loads((TINY_TOKENIZER / "tokenizer_config.json").read_text()), "chat_template": [1, 2]})}),
            FileReadError, r"tokenizer_config.json: chat_template must be a template string"),
    }


# ----------------------------------------------------------------------------- 3. processor geometry
def _geometry_cases():
    def config(**sections):
        return lambda tmp_path: load(tmp_path, **{"processor_config.json": processor_config(**sections)})

    def field(section, name, value, expected):
        where = rf"processor_config.json: {section}\.{name} must be {expected}.*, got "
        return config(**{section: {name: value}}), ProcessorConfigError, where

    return {
        "patch_size 1000000": field("image_processor", "patch_size", 1_000_000, r"an integer in \[1, 32\]"),
        "patch_size 0": field("image_processor", "patch_size", 0, r"an integer in \[1, 32\]"),
        "patch_size a string": field("image_processor", "patch_size", "16", r"an integer in \[1, 32\]"),
        "patch_size a float": field("image_processor", "patch_size", 16.0, r"an integer in \[1, 32\]"),
        "pooling_kernel_size 1000": field("image_processor", "pooling_kernel_size", 1000, r"an integer in \[1, 6\]"),
        "max_soft_tokens negative": field("image_processor", "max_soft_tokens", -5, r"one of \(70, 140, 280"),
        "max_soft_tokens absurd": field("image_processor", "max_soft_tokens", 10**12, r"one of \(70, 140, 280"),
        "rescale_factor 0": field("image_processor", "rescale_factor", 0, r"a finite number in \(0, 1\]"),
        "image_mean of 2 numbers": field("image_processor", "image_mean", [0.5, 0.5], r"a list of 3 finite numbers"),
        "image_std with a zero": field("image_processor", "image_std", [1, 0, 1], r"a list of 3 finite numbers in "
                                                                                   r"\(0, 1000\]"),
        "do_resize a string": field("image_processor", "do_resize", "yes", "true or false"),
        "resample 5": field("image_processor", "resample", 5, r"one of \(3,\) \(3 is bicubic"),
        "video max_soft_tokens 1e9": field("video_processor", "max_soft_tokens", 10**9, r"one of \(70,"),
        "video num_frames 0": field("video_processor", "num_frames", 0, r"an integer in \[1, 10000\] or null"),
        "video num_frames absurd": field("video_processor", "num_frames", 10**9, r"an integer in \[1, 10000\]"),
        "video fps a string": field("video_processor", "fps", "30", r"a finite number in \(0, 1000\] or null"),
        "audio sampling_rate negative": field("feature_extractor", "sampling_rate", -1, r"an integer in \[1, 1000000\]"),
        "audio padding_side": field("feature_extractor", "padding_side", "up", r"one of \('left', 'right'\)"),
        "audio feature_size absurd": field("feature_extractor", "feature_size", 10**9, r"an integer in \[1, 65536\]"),
        "audio feature_size not the frame": (config(feature_extractor={"feature_size": 320}), ProcessorConfigError,
                                             r"feature_extractor\.feature_size must equal audio_samples_per_token "
                                             r"\(640\), got 320"),
        "image_processor a list": (config(image_processor=[1, 2]), ProcessorConfigError,
                                   r"processor_config.json: image_processor must be a JSON object of its settings, "
                                   r"got a list"),
        "video_processor a string": (config(video_processor="fast"), ProcessorConfigError,
                                     r"video_processor must be a JSON object of its settings, got a string"),
        "image_seq_length a string": (config(image_seq_length="280"), ProcessorConfigError,
                                      r"processor_config.json: image_seq_length must be an integer in \[1, 1048576\], "
                                      r"got '280'"),
        "preprocessor_config.json patch_size 0": (
            lambda tmp_path: load(tmp_path, **{"processor_config.json": processor_config(image_processor={}),
                                               "preprocessor_config.json": '{"patch_size": 0}'}),
            ProcessorConfigError, r"preprocessor_config.json: patch_size must be an integer in \[1, 32\], got 0"),
        "call-time patch_size override": (
            lambda tmp_path: lambda: processing.ImageProcessor()(np.zeros((8, 8, 3), np.uint8), patch_size=10**6),
            ProcessorConfigError, r"ImageProcessor.patch_size must be an integer in \[1, 32\], got 1000000"),
    }


def test_geometry_is_refused_before_any_allocation(tmp_path, monkeypatch):
    """A bad patch_size never reaches numpy: no array is made while the processor is read."""
    made = []
    real = np.zeros
    monkeypatch.setattr(np, "zeros", lambda *a, **k: made.append(a) or real(*a, **k))
    with pytest.raises(ProcessorConfigError):
        load(tmp_path, **{"processor_config.json": processor_config(image_processor={"patch_size": 10**6})})()
    assert made == []


# ----------------------------------------------------------------------------- 4. bounded template rendering
HOSTILE_TEMPLATES = {
    # name: (template, regex naming the template and the budget)
    "nested range loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                           r"hostile.jinja: stopped after (2,000,000 steps|4 s)"),
    "2 ** (2 ** 36)": ("{{ 2 ** (2 ** 36) }}", r"hostile.jinja: 2 \*\* 68719476736 would make an integer of more "
                                                r"than 65,536 bits.*TemplateLimits.int_bits"),
    "'x' * 10**10": ("{{ 'x' * 10**10 }}", r"hostile.jinja: str \* 10000000000 would make 10,000,000,000 characters"),
    "[1] * 10**10": ("{{ [1] * 10**10 }}", r"hostile.jinja: list \* 10000000000 would make .* items"),
    "doubling with ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", r"hostile.jinja: this ~ join would make more than 8,388,608"),
    "doubling with +": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", r"hostile.jinja: str \+ str would make 16,777,216 characters"),
    "references to one long string": ("{% set s = 'x' * 8000000 %}{{ [s] * 100000 }}",
                                      r"hostile.jinja: this output would make more than 8,388,608 characters"),
    "joined references": ("{% set s = 'x' * 8000000 %}{{ ([s] * 100000)|join }}",
                          r"hostile.jinja: the join filter would make 800,000,000,000 characters"),
    "str.ljust": ("{{ 'x'.ljust(10**10) }}", r"hostile.jinja: str.ljust's argument 10000000000 is more than"),
    "center filter": ("{{ 'x'|center(10**10) }}", r"hostile.jinja: the center filter's argument 10000000000"),
    "% width": ("{{ '%99999999999s' % 'x' }}", r"hostile.jinja: the format width 99999999999 is more than"),
    "format filter width": ("{{ '%99999999999s'|format('x') }}", r"hostile.jinja: the format width 99999999999"),
    "str.format width": ("{{ '{:>99999999999}'.format('x') }}", r"hostile.jinja: the format spec '>99999999999'"),
    "indent of many lines": ("{{ ('\\n' * 1000000)|indent(1000000) }}", r"hostile.jinja: the indent filter would make"),
    "str.replace blow-up": ("{{ ('x' * 1000000).replace('x', 'y' * 1000000) }}", r"hostile.jinja: str.replace would"),
    "wordwrap blow-up": ("{{ ('x ' * 4000000)|wordwrap(1, wrapstring='y' * 100000) }}",
                         r"hostile.jinja: the wordwrap filter would make"),
    "tojson indent": ("{{ ([[1] * 1000] * 1000)|tojson(indent=10**6) }}", r"hostile.jinja: the tojson filter's indent"),
    "sum of lists": ("{{ ([[1] * 100] * 100000)|sum(start=[])|length }}", r"hostile.jinja: the sum filter would make"),
    "lipsum": ("{{ lipsum(10**6) }}", r"hostile.jinja: lipsum\(n=1000000, max=100\) asks for more than 100,000 words"),
    "macro recursion": ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
                        r"hostile.jinja: recursion deeper than Python allows"),
    "macro doubling": ("{% macro d(n) %}{% if n %}{% set s = d(n - 1) %}{{ s }}{{ s }}{% else %}x{% endif %}"
                       "{% endmacro %}{{ d(60) }}", r"hostile.jinja: the rendered text passed 8,388,608 characters"),
    "macro call tree": ("{% macro d(n) %}{% if n %}{{ d(n - 1) }}{{ d(n - 1) }}{% endif %}{% endmacro %}{{ d(40) }}",
                        r"hostile.jinja: stopped after (2,000,000 steps|4 s)"),
    "long output": ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
                    r"hostile.jinja: the rendered text passed 8,388,608 characters.*max_output_chars"),
    "repeated sorts": ("{% for i in range(100000) %}{{ ([3, 1, 2] * 80000)|sort|length }}{% endfor %}",
                       r"hostile.jinja: stopped after (2,000,000 steps|4 s)"),
    "recursive loop": ("{% for x in [1] recursive %}{{ loop(range(100000)) }}{% endfor %}",
                       r"hostile.jinja: (recursion deeper than Python allows|stopped after)"),
    "looping filter on a huge input": ("{{ ('ab' * 4000000)|unique|list|length }}",
                                       r"hostile.jinja: the unique filter's input would make 8,000,000 items"),
    "100k nested parentheses": ("{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}",
                                r"hostile.jinja: nested deeper than Python can compile"),
    "a 2 MB template": ("x" * (2 << 20), r"hostile.jinja: 2,097,152 characters, more than the limit of 1,048,576"),
}


def _template_cases():
    cases = {f"template: {name}": (lambda tmp_path, t=template: render(t), TemplateBudgetError, regex, TEMPLATE_SECONDS)
             for name, (template, regex) in HOSTILE_TEMPLATES.items()}
    # Through a processor folder: the error names the folder's template file.
    cases["template: a folder's chat_template.jinja"] = (
        lambda tmp_path: (lambda proc: lambda: proc.apply_chat_template([{"role": "user", "content": "hi"}]))(
            load(tmp_path, **{"chat_template.jinja": HOSTILE_TEMPLATES["2 ** (2 ** 36)"][0]})()),
        TemplateBudgetError, r"chat template .*/proc/chat_template.jinja: 2 \*\* 68719476736 would make", TEMPLATE_SECONDS)
    return cases


def test_the_time_budget_names_itself():
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    start = time.monotonic()
    with pytest.raises(TemplateBudgetError, match=r"stopped after 0.2 s, the time budget.*TemplateLimits.seconds"):
        processing.render_chat_template(template, [{"role": "user", "content": "x"}],
                                        template_limits=TemplateLimits(seconds=0.2, max_steps=10**12))
    assert time.monotonic() - start < 1.0


def test_a_budget_can_be_raised_for_a_long_render():
    template = "{% for i in range(100) %}{% for j in range(1000) %}{% endfor %}{% endfor %}done"
    with pytest.raises(TemplateBudgetError, match=r"stopped after 50,000 steps .*TemplateLimits.max_steps"):
        processing.render_chat_template(template, [{"role": "user", "content": "x"}],
                                        template_limits=TemplateLimits(max_steps=50_000))
    out = processing.render_chat_template(template, [{"role": "user", "content": "x"}],
                                          template_limits=TemplateLimits(max_steps=200_000, seconds=60))
    assert out == "done"


def test_ordinary_templates_render_as_in_a_plain_sandbox():
    """Loops, macros, filters, string methods and formatting within the budgets give jinja2's own output."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = ("{% macro m(x) %}<{{ x|upper }}>{% endmacro %}{% set ns = namespace(n=0) %}"
                "{% for msg in messages %}{% set ns.n = ns.n + loop.index * 2 %}{{ m(msg['role']) }}"
                "{{ msg['content']|trim|replace('a', 'b')|center(12) }}{{ '%03d' % loop.index }}"
                "{{ '{:>4}'.format(loop.length) }}{{ [1, 2] * 2 }}{{ 'ab' ~ 'cd' }}{{ 2 ** 10 }}"
                "{% for c in msg['content'] if c != ' ' recursive %}{{ c }}{% endfor %}{% endfor %}{{ ns.n }}"
                "{{ range(5)|list|join(',') }}{{ messages|map(attribute='role')|join('/') }}{{ 'x'.ljust(3) }}|")
    messages = [{"role": "user", "content": " a cat "}, {"role": "assistant", "content": "a dog"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    assert processing.render_chat_template(template, messages) == plain.render(messages=messages)


# ----------------------------------------------------------------------------- 5. parse_response
KB960 = 960 * 1024


def _parser_cases():
    def parse(text):
        return lambda tmp_path: lambda: processing.parse_response(text)

    unclosed = "<|tool_call>call:f{" * (KB960 // 19)
    return {
        "parse: 960 KB of unclosed tool calls": (parse(unclosed), ValueError,
                                                 r"^parse_response: a tool call was not closed with <tool_call\|>: "
                                                 r".{80,100}$", FAST),
        "parse: 100k-deep list": (parse("<|tool_call>call:f{a:" + "[" * 100_000 + "]" * 100_000 + "}<tool_call|>"),
                                  ValueError, r"arguments nested deeper than 256 levels, the limit", FAST),
        "parse: 100k-deep mapping": (parse("<|tool_call>call:f{a:" + "{b:" * 100_000 + "1" + "}" * 100_000
                                           + "}<tool_call|>"), ValueError, r"nested deeper than 256 levels", FAST),
        "parse: an unclosed string in 960 KB": (parse('<|tool_call>call:f{a:<|"|>' + "x" * KB960 + "}<tool_call|>"),
                                                ValueError, r"not closed at offset \d+ of tool-call arguments "
                                                            r".{0,100}$", FAST),
        "parse: junk after 960 KB of arguments": (parse("<|tool_call>call:f{a:1 " + "}" * KB960 + "}<tool_call|>"),
                                                  ValueError, r"unexpected .{80,90} at offset 4 of tool-call arguments "
                                                              r"of 983,044 characters$", FAST),
        "parse: a 10,000-digit number": (parse("<|tool_call>call:f{a:" + "9" * 10_000 + "}<tool_call|>"), ValueError,
                                         r"a number of 10,000 digits, more than Python reads", FAST),
    }


@pytest.mark.parametrize("shape", ["quotes", "channels", "calls"])
def test_parse_response_is_linear_on_many_quotes_channels_and_calls(shape):
    """Shapes that were quadratic (minutes at this size): strings whose closing quote is never followed by a
    separator, thinking channels, closed tool calls. 480 KB each; a fraction of a second without the test suite's
    type-checking hook."""
    n = KB960 // 2
    text = {"quotes": '<|tool_call>call:f{a:[' + '<|"|>x<|"|>y ' * (n // 13) + ']}<tool_call|>',
            "channels": "<|channel>thought\nx\n<channel|>" * (n // 29),
            "calls": "<|tool_call>call:f{a:1}<tool_call|>" * (n // 35)}[shape]
    start = time.monotonic()
    try:
        processing.parse_response(text)
    except ValueError as e:
        assert len(str(e)) < 300
    assert time.monotonic() - start < TEMPLATE_SECONDS


def test_parse_response_keeps_its_results():
    text = ('<|channel>thought\nA\n<channel|><|channel>B<channel|>Hi <|tool_call>call:f{a:<|"|>x<|"|>y<|"|>,'
            'b:[1,2.5,],c:{d:null,e:true},w: bare word }<tool_call|> there<|tool_call>call:g{}<tool_call|><turn|>x')
    assert processing.parse_response(text) == {
        "content": "Hi  there", "reasoning": "A\nB",
        "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {
            "a": 'x<|"|>y', "b": [1, 2.5], "c": {"d": None, "e": True}, "w": "bare word"}}},
                       {"type": "function", "function": {"name": "g", "arguments": {}}}]}
    assert chat_parser.MAX_ARGUMENT_DEPTH == 256
    deep = "<|tool_call>call:f{a:" + "[" * 254 + "]" * 254 + "}<tool_call|>"  # 255 levels with the top mapping
    nested = processing.parse_response(deep)["tool_calls"][0]["function"]["arguments"]["a"]
    for _ in range(253):
        nested = nested[0]
    assert nested == []


# ----------------------------------------------------------------------------- 6. videos sampled while decoding
FRAMES = np.random.default_rng(0).integers(0, 256, (300, 16, 24, 3), dtype=np.uint8)


def _video_cases():
    def unsampled_over_the_cap(tmp_path):
        pytest.importorskip("av")
        write_video(tmp_path / "v.mkv", FRAMES[:40])
        return lambda: processing.VideoProcessor()(str(tmp_path / "v.mkv"), do_sample_frames=False)

    return {
        "video: every frame kept past the cap": (unsampled_over_the_cap, ValueError,
                                                 r"v.mkv: more than 30 frames, the limit of frames kept from one video",
                                                 FAST),
    }


@pytest.mark.parametrize("codec,suffix", [("ffv1", "mkv"), ("mpeg4", "mp4")])
def test_videos_decode_only_the_sampled_frames(tmp_path, codec, suffix, monkeypatch):
    """A 300-frame file gives the very arrays of decoding every frame then sampling, converting only the 32 it keeps
    (Matroska stores no frame count: its packets are counted; MP4 gives it)."""
    av = pytest.importorskip("av")
    path = tmp_path / f"v.{suffix}"
    write_video(path, FRAMES, codec=codec)
    with av.open(str(path)) as container:  # the reference: every frame decoded, then sampled as transformers does
        every = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert len(every) == 300
    checked = []  # the stream's size, then each frame's before it is converted to RGB
    real = video_module._check_frame_size
    monkeypatch.setattr(video_module, "_check_frame_size", lambda *a: checked.append(a) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_file = processing.VideoProcessor()(str(path))
        from_array = processing.VideoProcessor()(every, video_metadata={"fps": 30.0})
    assert len(checked) == 1 + 32
    for name in ("pixel_values_videos", "video_position_ids"):
        np.testing.assert_array_equal(from_file[name], from_array[name], err_msg=name)
    assert from_file["video_metadata"][0].frames_indices == from_array["video_metadata"][0].frames_indices
    assert from_file["video_metadata"][0].total_num_frames == 300


def test_a_frame_count_found_too_high_is_corrected(tmp_path, monkeypatch):
    """A container that claims more frames than it has: decoding finds the end, and the frames are sampled again
    from the true count (so the result is that of decoding everything)."""
    pytest.importorskip("av")
    path = tmp_path / "v.mkv"
    write_video(path, FRAMES[:50])
    real = video_module._count_packets
    monkeypatch.setattr(video_module, "_count_packets", lambda *a: real(*a) + 7)
    frames, meta = processing.load_video(path, sample=lambda m: np.arange(32) * m["total_num_frames"] // 32)
    assert meta["total_num_frames"] == 50
    np.testing.assert_array_equal(frames, FRAMES[:50][np.arange(32) * 50 // 32])


# ----------------------------------------------------------------------------- the table
CASES = {**{k: (*v, FAST) for k, v in {**_files_cases(), **_reader_cases(), **_geometry_cases()}.items()},
         **_template_cases(), **_parser_cases(), **_video_cases()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_refused_by_name_in_time(name, tmp_path, monkeypatch):
    build, kind, message, seconds = CASES[name]
    monkeypatch.setattr(video_module, "MAX_KEPT_FRAMES", 30)
    call = build(tmp_path)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(kind, match=message) as caught:
            call()
    took = time.monotonic() - start
    assert took < seconds, f"{name}: {took:.2f} s, more than {seconds} s"
    assert len(str(caught.value)) < 600, "errors quote short excerpts, never whole inputs"


def test_processor_files_follow_only_the_folder_symlink_rule(tmp_path):
    """chat_template.jinja, tokenizer.json and the JSON configs are read as checkpoint files: a symlink to a file
    outside the folder is refused naming the rule; one to another file of the folder is followed."""
    import gemma4_eqx as g4

    folder = tmp_path / "proc"
    shutil.copytree(g4.assets.TINY_CHECKPOINT, folder)
    outside = tmp_path / "elsewhere.jinja"
    outside.write_text((folder / "chat_template.jinja").read_text())
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").symlink_to(outside)
    with pytest.raises(FileReadError, match=r"chat_template\.jinja: a symlink to .* outside the folder"):
        g4.Processor.from_pretrained(folder)
    (folder / "chat_template.jinja").unlink()
    (folder / "template.real").write_text(outside.read_text())
    (folder / "chat_template.jinja").symlink_to("template.real")  # inside the folder: followed
    assert g4.Processor.from_pretrained(folder).chat_template == outside.read_text()
