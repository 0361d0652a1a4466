"""Hostile checkpoint files and save targets, round two (issue 34): every case below is refused with a named error
(the file or argument named) before any work is done, never hangs (FIFO cases run under a timeout), and never
deletes a file the save did not write. The concurrency test: a load racing a save into the same folder sees the
old checkpoint or the new one, whole, never a mix.

Cases (`CASES`, one test each): FIFOs and /dev/zero as config.json (the quantization probe and the config
reader), index or generation_config.json; symlinks out of the folder (weights, index shards, config.json) while
the Hugging Face cache's links into blobs/ load; NaN / infinite weights and a cast that overflows; quantized
scales and codes; an inconsistent quantization_config; GGUF files that are FIFOs, empty, garbage, truncated, with
transposed or reshaped tensors, NaN values or NaN block scales; saves into folders holding others' weights, stale
temporaries, dangerous targets ("", /, system folders, the home or working directory); `info` on a config whose
shapes int4 cannot group.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import gemma4_eqx as g4
from gemma4_eqx.assets import TINY_CHECKPOINT
from gemma4_eqx.config import ConfigError, GenerationConfig
from gemma4_eqx.io import quantized
from gemma4_eqx.io.reader import FolderChangedError, NonFiniteError
from gemma4_eqx.io.names import TEXT_PREFIX, tensor_specs

ROOT = pathlib.Path(__file__).resolve().parents[1]
INDEX = "model.safetensors.index.json"
NORM = TEXT_PREFIX + "layers.1.input_layernorm.weight"
GATE = TEXT_PREFIX + "layers.2.mlp.gate_proj.weight"
TIMEOUT = 60  # seconds any case may take before it counts as hung


@pytest.fixture(scope="module")
def tiny():
    return g4.load(TINY_CHECKPOINT)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny):
    """Module-wide folders each case copies: the tiny checkpoint sharded, and saved int8 / int4."""
    base = tmp_path_factory.mktemp("sources")
    g4.save(tiny, base / "sharded", max_shard_size="500KB")
    g4.save(g4.quantize(tiny, "int8"), base / "int8")
    g4.save(g4.quantize(tiny, "int4"), base / "int4")
    return base


def _copy(src, dst) -> pathlib.Path:
    shutil.copytree(src, dst, symlinks=True)
    return pathlib.Path(dst)


def _edit_tensors(folder: pathlib.Path, change, file: str = "model.safetensors") -> None:
    tensors = load_file(str(folder / file))
    change(tensors)
    (folder / file).unlink()
    save_file(tensors, str(folder / file), metadata={"format": "pt"})


def _edit_config(folder: pathlib.Path, change) -> None:
    d = json.loads((folder / "config.json").read_text())
    change(d)
    (folder / "config.json").write_text(json.dumps(d))


def _run(fn, fifos=()):
    """fn() in a thread; a FIFO open it is stuck in is released after TIMEOUT seconds, and the case fails as hung."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        for fifo in fifos:  # release a reader blocked in open(): a writer end opened and closed
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        thread.join(5)
        pytest.fail(f"hung for more than {TIMEOUT} s")
    if "error" in out:
        raise out["error"]
    return out.get("value")


# ---- builders: each returns (the call, FIFOs it may block on, a check run after the refusal) ------------------------
def _ckpt(tmp_path, sources=None, sharded=False):
    return _copy(sources / "sharded" if sharded else TINY_CHECKPOINT, tmp_path / "ckpt")


def fifo_config(tmp_path, **_):
    folder = _ckpt(tmp_path)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return lambda: g4.load(folder), [folder / "config.json"], None


def fifo_config_probe(tmp_path, **_):
    folder = _ckpt(tmp_path)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return lambda: quantized.saved_quant_config(str(folder)), [folder / "config.json"], None


def dev_zero_config(tmp_path, **_):
    folder = _ckpt(tmp_path)
    (folder / "config.json").unlink()
    os.symlink("/dev/zero", folder / "config.json")
    return lambda: g4.load(folder), [], None


def dev_zero_config_file(tmp_path, **_):
    return lambda: g4.Gemma4Config.from_pretrained("/dev/zero"), [], None


def huge_config(tmp_path, **_):
    folder = _ckpt(tmp_path)
    with open(folder / "config.json", "r+b") as f:
        f.truncate(64 << 20)  # sparse: no disk used
    return lambda: g4.load(folder), [], None


def fifo_index(tmp_path, sources, **_):
    folder = _ckpt(tmp_path, sources, sharded=True)
    (folder / INDEX).unlink()
    os.mkfifo(folder / INDEX)
    return lambda: g4.load(folder), [folder / INDEX], None


def fifo_generation_config(tmp_path, **_):
    folder = _ckpt(tmp_path)
    (folder / "generation_config.json").unlink()
    os.mkfifo(folder / "generation_config.json")
    return lambda: GenerationConfig.from_pretrained(folder), [folder / "generation_config.json"], None


def fifo_generation_config_cli(tmp_path, **_):
    from gemma4_eqx.cli import commands

    folder = _ckpt(tmp_path)
    (folder / "generation_config.json").unlink()
    os.mkfifo(folder / "generation_config.json")
    return lambda: commands._generation_defaults(str(folder)), [folder / "generation_config.json"], None


def fifo_surgery_config(tmp_path, tiny, **_):
    folder = tmp_path / "edited"
    g4.surgery.save(tiny, folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    return lambda: g4.surgery.load(folder, lambda m: m), [folder / "config.json"], None


def _outside(tmp_path) -> pathlib.Path:
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.copy(TINY_CHECKPOINT / "model.safetensors", secret)  # a valid file: only the link's shape is wrong
    return secret


def link_out_weights(tmp_path, **_):
    folder = _ckpt(tmp_path)
    secret = _outside(tmp_path)
    (folder / "model.safetensors").unlink()
    os.symlink(secret, folder / "model.safetensors")
    return lambda: g4.load(folder), [], None


def link_out_shard(tmp_path, sources, **_):
    folder = _ckpt(tmp_path, sources, sharded=True)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(shard, outside / shard.name)
    os.symlink(os.path.relpath(outside / shard.name, folder), shard)
    return lambda: g4.load(folder), [], None


def link_out_config(tmp_path, **_):
    folder = _ckpt(tmp_path)
    outside = tmp_path / "outside.json"
    shutil.move(folder / "config.json", outside)
    os.symlink(outside, folder / "config.json")
    return lambda: g4.load(folder), [], None


def link_out_of_snapshot(tmp_path, **_):
    """A Hub-cache-shaped folder whose link leaves for a sibling of blobs/, not blobs/ itself."""
    repo = tmp_path / "models--o--n"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "elsewhere").mkdir()
    for f in TINY_CHECKPOINT.iterdir():
        shutil.copy(f, repo / "elsewhere" / f.name)
        os.symlink(f"../../elsewhere/{f.name}", snap / f.name)
    return lambda: g4.load(snap), [], None


def _nan_weights(value, name=NORM):
    def build(tmp_path, **_):
        folder = _ckpt(tmp_path)

        def change(t):
            t[name] = t[name].copy()
            t[name].reshape(-1)[3] = value

        _edit_tensors(folder, change)
        return lambda: g4.load(folder), [], None

    return build


def overflow_on_cast(tmp_path, **_):
    folder = _ckpt(tmp_path)

    def change(t):
        t[NORM] = t[NORM].copy()
        t[NORM][0] = 1e6  # finite in float32, infinite in float16

    _edit_tensors(folder, change)
    return lambda: g4.load(folder, dtype=jnp.float16), [], None


def _quantized(mode, edit):
    def build(tmp_path, sources, **_):
        folder = _copy(sources / mode, tmp_path / "q")
        _edit_tensors(folder, edit)
        return lambda: g4.load(folder), [], None

    return build


def _set(name, index, value, dtype=None):
    def change(t):
        t[name] = t[name].copy()
        t[name][index] = value if dtype is None else np.asarray(value, dtype)

    return change


def nan_norm_in_quantized(tmp_path, sources, **_):
    return _quantized("int8", _set(NORM, 0, np.nan))(tmp_path, sources)


def bits_contradict_mode(tmp_path, sources, **_):
    folder = _copy(sources / "int4", tmp_path / "q")
    _edit_config(folder, lambda d: d["quantization_config"].update(bits=8))
    return lambda: g4.load(folder), [], None


def quantize_nan_on_the_fly(tmp_path, **_):
    folder = _ckpt(tmp_path)
    _edit_tensors(folder, _set(GATE, (0, 0), np.nan))
    return lambda: g4.load(folder, quantize="int4"), [], None


# ---- GGUF -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_tensors(tiny):
    """The tiny model's text tensors as the GGUF writer takes them: {gguf name: (float32 array, Q4_0 or None)}."""
    gguf = pytest.importorskip("gguf")
    from gemma4_eqx.io import gguf as gguf_io
    from gemma4_eqx.io.save import host_tensors

    specs = [s for s in tensor_specs(tiny) if s.name.startswith(TEXT_PREFIX)]
    table, _ = gguf_io.name_table(specs)
    q4 = gguf.GGMLQuantizationType.Q4_0
    return {table[n]: (a.astype(np.float32), q4 if a.ndim == 2 else None) for n, a in host_tensors(tiny, specs)}


def _write_gguf(path, tensors, raw=None):
    import gguf

    w = gguf.GGUFWriter(str(path), "gemma4")
    for name, (data, qtype) in tensors.items():
        if raw and name in raw:
            w.add_tensor(name, raw[name], raw_dtype=gguf.GGMLQuantizationType.Q4_0)
        elif qtype is not None:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_case(change=None, raw=None, after_write=None):
    def build(tmp_path, gguf_tensors, **_):
        from gemma4_eqx.io import gguf as gguf_io

        tensors = dict(gguf_tensors)
        if change is not None:
            change(tensors)
        path = tmp_path / "m.gguf"
        _write_gguf(path, tensors, raw(tensors) if raw else None)
        if after_write is not None:
            after_write(path)
        config = g4.Gemma4Config.from_pretrained(TINY_CHECKPOINT).replace(vision=None, audio=None)
        return lambda: gguf_io.load_gguf(path, config, dtype=jnp.float32), [path], None

    return build


def _transpose_gate(t):
    data, q = t["blk.2.ffn_gate.weight"]
    t["blk.2.ffn_gate.weight"] = (np.ascontiguousarray(data.T), q)


def _square_norm(t):
    data, q = t["blk.1.attn_norm.weight"]
    t["blk.1.attn_norm.weight"] = (data.reshape(8, 8), None)  # 64 values: a reshape would have "worked"


def _nan_gguf_norm(t):
    data, q = t["blk.1.attn_norm.weight"]
    data = data.copy()
    data[5] = np.nan
    t["blk.1.attn_norm.weight"] = (data, q)


def _nan_block_scale(t):
    import gguf

    data, _ = t["blk.0.attn_q.weight"]
    blocks = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0).copy()
    blocks[0, 0:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # block 0's fp16 scale
    return {"blk.0.attn_q.weight": blocks}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def gguf_fifo(tmp_path, **_):
    from gemma4_eqx.io import gguf as gguf_io

    os.mkfifo(tmp_path / "m.gguf")
    config = g4.Gemma4Config.from_pretrained(TINY_CHECKPOINT).replace(vision=None, audio=None)
    return lambda: gguf_io.load_gguf(tmp_path / "m.gguf", config), [tmp_path / "m.gguf"], None


def _gguf_bytes(data: bytes):
    def build(tmp_path, **_):
        from gemma4_eqx.io import gguf as gguf_io

        (tmp_path / "m.gguf").write_bytes(data)
        config = g4.Gemma4Config.from_pretrained(TINY_CHECKPOINT).replace(vision=None, audio=None)
        return lambda: gguf_io.load_gguf(tmp_path / "m.gguf", config), [], None

    return build


# ---- saves ------------------------------------------------------------------------------------------------------
def _kept(*paths_and_bytes):
    def check():
        for path, data in paths_and_bytes:
            assert path.read_bytes() == data, f"{path} changed or deleted"

    return check


def _foreign(name):
    def build(tmp_path, tiny, **_):
        folder = _ckpt(tmp_path)
        data = b"not ours" * 100
        (folder / name).write_bytes(data)
        old = (folder / "model.safetensors").read_bytes()
        return (lambda: g4.save(tiny, folder), [],
                _kept((folder / name, data), (folder / "model.safetensors", old)))

    return build


def _convert_to(out_of):
    def build(tmp_path, monkeypatch, **_):
        from gemma4_eqx import cli

        out = out_of(tmp_path, monkeypatch)

        def call():
            code = cli.main(["convert", "--model", str(TINY_CHECKPOINT), "--out", out])
            if code != 1:
                raise AssertionError(f"exit status {code}")
            raise CliRefused

        return call, [], None

    return build


class CliRefused(Exception):
    """`cli.main` returned 1 (its message went to stderr, checked by the test)."""


def _save_to(target_of):
    def build(tmp_path, tiny, monkeypatch, **_):
        target = target_of(tmp_path, monkeypatch)
        before = sorted(os.listdir(os.path.dirname(os.path.realpath(target)) or "/")) if target else None
        parent = os.path.dirname(os.path.realpath(target)) if target else None

        def check():
            if parent is not None:
                assert not [n for n in os.listdir(parent) if ".g4-save-" in n], "a staging folder was made"
                assert sorted(os.listdir(parent)) == before

        return lambda: g4.save(tiny, target), [], check

    return build


def _home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return str(home)


def _cwd(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return "."


def _holds_cwd(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    return str(tmp_path / "a")


def info_int4_na(tmp_path, capsys, **_):
    from gemma4_eqx import cli

    g4.small_config(hidden_size=48, vision=False, audio=False).save_pretrained(tmp_path)

    def call():
        assert cli.main(["info", "--model", str(tmp_path / "config.json"), "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        int4 = next(v for k, v in out.items() if k.startswith("weights in int4"))
        int8 = next(v for k, v in out.items() if k.startswith("weights in int8"))
        assert "GiB" in int8
        raise CliRefused(int4)

    return call, [], None


# name -> (builder, expected exception, regex the message must match)
CASES = {
    # hangs and memory bombs
    "config.json is a FIFO": (fifo_config, ConfigError, r"ckpt/config\.json: not a regular file, it is a FIFO"),
    "config.json is a FIFO (quantization probe)": (fifo_config_probe, ConfigError,
                                                   r"ckpt/config\.json: not a regular file, it is a FIFO"),
    "config.json -> /dev/zero": (dev_zero_config, ConfigError,
                                 r"ckpt/config\.json: a symlink to '/dev/zero', outside the folder"),
    "config.json named as /dev/zero": (dev_zero_config_file, ConfigError,
                                       r"/dev/zero: not a regular file, it is a character device"),
    "config.json of 64 MiB": (huge_config, ConfigError, r"ckpt/config\.json: 67,108,864 bytes .* more than the limit"),
    "index is a FIFO": (fifo_index, g4.CheckpointError,
                        r"ckpt/model\.safetensors\.index\.json: not a regular file, it is a FIFO"),
    "generation_config.json is a FIFO": (fifo_generation_config, ConfigError,
                                         r"ckpt/generation_config\.json: not a regular file, it is a FIFO"),
    "generation_config.json is a FIFO (cli)": (fifo_generation_config_cli, Exception,
                                               r"ckpt/generation_config\.json: not a regular file, it is a FIFO"),
    "surgery config.json is a FIFO": (fifo_surgery_config, ConfigError,
                                      r"edited/config\.json: not a regular file, it is a FIFO"),
    # confinement
    "model.safetensors -> outside": (link_out_weights, g4.CheckpointError,
                                     r"ckpt/model\.safetensors: a symlink to '.*outside/secret\.safetensors', "
                                     r"outside the folder"),
    "a shard -> ../outside": (link_out_shard, g4.CheckpointError,
                              r"ckpt/model-00001-of-\d{5}\.safetensors: a symlink to '\.\./outside/.*', outside"),
    "config.json -> outside": (link_out_config, ConfigError, r"ckpt/config\.json: a symlink to .*outside\.json"),
    "snapshot link beside blobs/": (link_out_of_snapshot, ConfigError,
                                    r"config\.json: a symlink to '\.\./\.\./elsewhere/config\.json', outside"),
    # silent wrong answers
    "NaN weight": (_nan_weights(np.nan), NonFiniteError,
                   rf"{NORM} in .*ckpt/model\.safetensors: 1 NaN and 0 infinite values \(first at index \(3,\)\)"),
    "infinite weight": (_nan_weights(-np.inf), NonFiniteError, rf"{NORM} in .*: 0 NaN and 1 infinite values"),
    "NaN in a projection": (_nan_weights(np.nan, GATE), NonFiniteError, rf"{GATE} in .*model\.safetensors: 1 NaN"),
    "float16 cast overflows": (overflow_on_cast, NonFiniteError, rf"{NORM} in .*: its values are finite as stored "
                                                                 r"\(float32\) but overflow float16"),
    "int8 scale NaN": (_quantized("int8", _set(GATE.replace(".weight", ".scales"), (0, 0), np.nan)),
                       g4.CheckpointError, r"gate_proj\.scales in .*q/model\.safetensors: 1 scales are not finite "
                                           r"numbers > 0 \(first nan"),
    "int8 scale negative": (_quantized("int8", _set(GATE.replace(".weight", ".scales"), (0, 0), -1.0)),
                            g4.CheckpointError, r"gate_proj\.scales .*not finite numbers > 0"),
    "int4 scale infinite": (_quantized("int4", _set(GATE.replace(".weight", ".scales"), (0, 0), np.inf)),
                            g4.CheckpointError, r"gate_proj\.scales in .*: 1 scales are not finite numbers \(first inf"),
    "int8 code -128": (_quantized("int8", _set(GATE.replace(".weight", ".qweight"), (0, 0), -128, np.int8)),
                       g4.CheckpointError, r"gate_proj\.qweight in .*: int8 code -128 at index \(0, 0\) is outside "
                                           r"\[-127, 127\]"),
    "NaN norm in a quantized folder": (nan_norm_in_quantized, NonFiniteError, rf"{NORM} in .*q/model\.safetensors"),
    "quantization_config bits 8, mode int4": (bits_contradict_mode, ConfigError,
                                              r"q/config\.json: quantization_config: bits: 8 contradicts mode 'int4'"),
    "NaN quantized on the fly": (quantize_nan_on_the_fly, NonFiniteError, rf"{GATE} in .*ckpt/model\.safetensors"),
    "GGUF: transposed MLP weight": (_gguf_case(_transpose_gate), g4.CheckpointError,
                                    r"m\.gguf: blk\.2\.ffn_gate\.weight \(.*gate_proj\.weight\): expected shape "
                                    r"\(128, 64\).*found \(64, 128\)"),
    "GGUF: [8, 8] norm": (_gguf_case(_square_norm), g4.CheckpointError,
                          r"m\.gguf: blk\.1\.attn_norm\.weight .*expected shape \(64,\).*found \(8, 8\)"),
    "GGUF: NaN norm": (_gguf_case(_nan_gguf_norm), NonFiniteError,
                       r"blk\.1\.attn_norm\.weight \(.*\) in .*m\.gguf: 1 NaN"),
    "GGUF: NaN Q4_0 block scale": (_gguf_case(raw=_nan_block_scale), NonFiniteError,
                                   r"blk\.0\.attn_q\.weight \(.*\) in .*m\.gguf: 1 NaN .* among its Q4_0 block scales"),
    "GGUF: a FIFO": (gguf_fifo, g4.CheckpointError, r"m\.gguf: not a regular file, it is a FIFO"),
    "GGUF: empty": (_gguf_bytes(b""), g4.CheckpointError, r"m\.gguf: an empty file; expected a GGUF file"),
    "GGUF: not GGUF": (_gguf_bytes(b"PK\x03\x04" + b"\0" * 60), g4.CheckpointError,
                       r"m\.gguf: not a readable GGUF file \(ValueError: GGUF magic invalid"),
    "GGUF: truncated": (_gguf_case(after_write=_truncate), g4.CheckpointError, r"m\.gguf: not a readable GGUF file"),
    # saves
    "save over other-model.safetensors": (_foreign("other-model.safetensors"), g4.CheckpointError,
                                          r"ckpt: holds files this save would delete that it did not write: "
                                          r"other-model\.safetensors; .*overwrite=True"),
    "save over an adapter": (_foreign("adapter_model.safetensors"), g4.CheckpointError,
                             r"would delete that it did not write: adapter_model\.safetensors"),
    "save over a stray .partial": (_foreign("download.partial"), g4.CheckpointError,
                                   r"did not write: download\.partial"),
    "save into ''": (_save_to(lambda tmp_path, mp: ""), g4.CheckpointError,
                     r"folder: '' is empty, which would name the working directory"),
    "save into /": (_save_to(lambda tmp_path, mp: "/"), g4.CheckpointError, r"folder /: refused, .* a system folder"),
    "save into /usr": (_save_to(lambda tmp_path, mp: "/usr"), g4.CheckpointError, r"folder /usr: refused"),
    "save into /etc": (_save_to(lambda tmp_path, mp: "/etc"), g4.CheckpointError, r"folder /etc: refused"),
    "save into the home directory": (_save_to(_home), g4.CheckpointError, r"refused, .*it is the home directory"),
    "save into the working directory": (_save_to(_cwd), g4.CheckpointError,
                                        r"folder \.: refused, .*it is the working directory"),
    "save into a folder holding the working directory": (_save_to(_holds_cwd), g4.CheckpointError,
                                                         r"refused, .*it holds the working directory"),
    "convert --out ''": (_convert_to(lambda tmp_path, mp: ""), CliRefused, r"--out: '' is empty"),
    "convert --out /": (_convert_to(lambda tmp_path, mp: "/"), CliRefused, r"--out /: refused"),
    "convert --out over an adapter": (_convert_to(lambda tmp_path, mp: (
        _ckpt(tmp_path) / "adapter_model.safetensors").write_bytes(b"x") and str(tmp_path / "ckpt")),
        CliRefused, r"--out .*ckpt: .*did not write: adapter_model\.safetensors; .*--overwrite"),
    # unclear errors
    "info with 48 input features": (info_int4_na, CliRefused,
                                    r"^n/a: 48 input features do not split into groups of 32$"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_refused_by_name(case, tmp_path, sources, tiny, gguf_tensors, monkeypatch, capsys):
    build, error, pattern = CASES[case]
    call, fifos, check = build(tmp_path=tmp_path, sources=sources, tiny=tiny, gguf_tensors=gguf_tensors,
                               monkeypatch=monkeypatch, capsys=capsys)
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            _run(call, fifos)
    message = capsys.readouterr().err.strip() if error is CliRefused and not info.value.args else str(info.value)
    assert re.search(pattern, message), f"{case}: {message!r} does not match {pattern!r}"
    assert time.monotonic() - start < TIMEOUT
    if check is not None:
        check()


# ---- what is allowed ---------------------------------------------------------------------------------------------
def test_check_finite_false_loads_what_it_is_told(tmp_path):
    folder = _ckpt(tmp_path)
    _edit_tensors(folder, _set(NORM, 3, np.nan))
    model = g4.load(folder, check_finite=False)
    assert np.isnan(np.asarray(model.layers.layer(1).input_layernorm.weight)).sum() == 1


def test_the_hub_cache_shape_and_links_inside_the_folder_load(tmp_path, tiny):
    repo = tmp_path / "models--o--n"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in TINY_CHECKPOINT.iterdir():
        shutil.copy(f, repo / "blobs" / f"blob-{f.name}")
        os.symlink(f"../../blobs/blob-{f.name}", snap / f.name)
    inside = _ckpt(tmp_path)
    os.rename(inside / "model.safetensors", inside / "weights-v2.safetensors")
    os.symlink("weights-v2.safetensors", inside / "model.safetensors")
    for folder in (snap, inside):
        for a, b in zip(jax.tree.leaves(g4.load(folder)), jax.tree.leaves(tiny)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_overwrite_deletes_only_what_it_was_told_and_temporaries_are_never_carried(tmp_path, tiny):
    folder = _ckpt(tmp_path)
    (folder / "other-model.safetensors").write_bytes(b"x")
    (folder / "config.json.1234.tmp").write_text("{")
    (folder / "model.safetensors.partial").write_bytes(b"half")
    (folder / "notes.txt").write_text("mine")
    g4.save(tiny, folder, overwrite=True)
    names = set(os.listdir(folder))
    assert "other-model.safetensors" not in names and "config.json.1234.tmp" not in names
    assert "model.safetensors.partial" not in names and (folder / "notes.txt").read_text() == "mine"
    (folder / "config.json.99.tmp").write_text("{")  # our own stale temporary: dropped without overwrite
    g4.save(tiny, folder)
    assert "config.json.99.tmp" not in os.listdir(folder)


# ---- a load racing a save ------------------------------------------------------------------------------------------
SAVER = """
import os, sys, time, warnings
os.nice(10)  # the loads come first
warnings.simplefilter("ignore")
import gemma4_eqx as g4
a, b, target, stop = sys.argv[1:]
models = [g4.load(a), g4.load(b)]
open(stop + ".ready", "w").close()
n = 0
while not os.path.exists(stop):  # A as one file, B as shards with an index: the layouts differ too
    g4.save(models[n % 2], target, max_shard_size="5GB" if n % 2 == 0 else "400KB")
    n += 1
    time.sleep(0.01)  # a core left to the loads on a 2-core machine
print(n)
"""


def test_a_load_racing_saves_sees_one_checkpoint_whole(tmp_path, tiny, monkeypatch):
    """One process saves two different checkpoints (weights and config.json) into one folder in a loop while this
    one loads it 200 times: each load equals one of them bit for bit, or raises FolderChangedError."""
    from gemma4_eqx.utils import files

    swaps = [0]  # openings that found the folder swapped under them and started again
    replaced = files.Folder.replaced

    def counted(self):
        swapped = replaced(self)
        swaps[0] += swapped
        return swapped

    monkeypatch.setattr(files.Folder, "replaced", counted)
    a_dir, b_dir, target, stop = tmp_path / "a", tmp_path / "b", tmp_path / "target", tmp_path / "stop"
    shutil.copytree(TINY_CHECKPOINT, a_dir)
    other = jax.tree.map(lambda x: x * 1.5 + 0.25 if isinstance(x, jax.Array) and x.dtype == jnp.float32 else x, tiny)
    g4.save(other, b_dir, max_shard_size="400KB")  # B is sharded: the two layouts differ too
    tiny.config.replace(eos_token_id=(1, 106, 7)).save_pretrained(b_dir, dtype="float32")
    shutil.copytree(a_dir, target)
    expected = {name: ([np.asarray(x).tobytes() for x in jax.tree.leaves(g4.load(d))],
                       g4.Gemma4Config.from_pretrained(d)) for name, d in (("a", a_dir), ("b", b_dir))}
    assert expected["a"][1] != expected["b"][1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(a_dir), str(b_dir), str(target), str(stop)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = {"a": 0, "b": 0, "changed": 0}
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(str(stop) + ".ready"):
            assert saver.poll() is None and time.monotonic() < deadline, saver.communicate()[1][-2000:]
            time.sleep(0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the staging folder beside the target is named on every load
            for _ in range(200):
                try:
                    model = g4.load(target)
                except FolderChangedError:
                    seen["changed"] += 1
                    continue
                leaves = [np.asarray(x).tobytes() for x in jax.tree.leaves(model)]
                match = [name for name, (want, config) in expected.items()
                         if leaves == want and model.config == config]
                assert len(match) == 1, "a load that is neither checkpoint whole"
                seen[match[0]] += 1
    finally:
        stop.touch()
        out, err = saver.communicate(timeout=120)
    assert saver.returncode == 0, err[-2000:]
    saves = int(out.strip())
    print(f"\n200 loads during {saves} saves: {seen}; {swaps[0]} openings met a swap and started again")
    assert seen["a"] + seen["b"] + seen["changed"] == 200 and saves > 10
    assert seen["a"] > 0 and seen["b"] > 0
