"""Record torch's CPU results for the operations that `numerics="torch_cpu"` reproduces (tests/test_numerics.py).

Run in the transformers venv (python3.11, torch 2.13.0 CPU, transformers 5.24.0; see DEVELOPERS.md):

    .venv-hf/bin/python scripts/record_torch_numerics.py --out tests/fixtures/torch_numerics.npz

Writes, from fixed seeds:
- `sum/<n>/x`, `sum/<n>/sum`, `sum/<n>/mean_sq`: float32 rows of width n (mixed signs and scales), torch's
  `x.sum(-1)` and `x.pow(2).mean(-1)`;
- `rsqrt/x`, `rsqrt/pow`: positive float32 values and torch's `pow(x, -0.5)`;
- `gelu/bfloat16`, `gelu/float16`: `gelu(x, approximate="tanh")` of every 16-bit pattern, as uint16 bits;
- `rmsnorm/<dtype>/<n>/{x,weight,out}`: transformers' `Gemma4UnifiedRMSNorm` on rows of width n (16-bit values
  stored as uint16 bits).
Never edit the output by hand; regenerate it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

SUM_WIDTHS = (1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 48, 64, 96, 100, 127, 160, 192, 256, 512, 1000, 3840)
NORM_WIDTHS = (8, 16, 48, 96, 256, 3840)
ROWS = 64


def rows(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    scale = np.exp(rng.uniform(-4, 4, (count, 1)))
    return (rng.standard_normal((count, n)) * scale).astype(np.float32)


def bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    out_path = parser.parse_args().out
    torch.manual_seed(0)
    rng = np.random.default_rng(20261128)
    out: dict[str, np.ndarray] = {}

    for n in SUM_WIDTHS:
        x = rows(rng, n, ROWS if n <= 512 else 8)
        t = torch.from_numpy(x)
        out[f"sum/{n}/x"] = x
        out[f"sum/{n}/sum"] = t.sum(-1).numpy()
        out[f"sum/{n}/mean_sq"] = t.pow(2).mean(-1).numpy()

    x = np.exp(rng.uniform(-20, 20, 20000)).astype(np.float32)
    out["rsqrt/x"] = x
    out["rsqrt/pow"] = torch.pow(torch.from_numpy(x), -0.5).numpy()

    every = torch.from_numpy(np.arange(1 << 16, dtype=np.uint16).view(np.int16))
    for dtype in (torch.bfloat16, torch.float16):
        values = every.view(dtype)
        out[f"gelu/{str(dtype).removeprefix('torch.')}"] = bits(torch.nn.functional.gelu(values, approximate="tanh"))

    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for n in NORM_WIDTHS:
            norm = Gemma4UnifiedRMSNorm(n, eps=1e-6)
            with torch.no_grad():
                norm.weight.copy_(torch.from_numpy(rng.uniform(0.25, 3.0, n).astype(np.float32)))
            norm = norm.to(dtype)
            x = torch.from_numpy(rows(rng, n, 64 if n <= 256 else 8)).to(dtype)
            with torch.no_grad():
                y = norm(x)
            store = (lambda t: t.numpy()) if dtype == torch.float32 else bits
            out[f"rmsnorm/{name}/{n}/x"] = store(x)
            out[f"rmsnorm/{name}/{n}/weight"] = store(norm.weight.detach())
            out[f"rmsnorm/{name}/{n}/out"] = store(y)

    import transformers

    out["_info"] = np.array(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                                        "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    np.savez_compressed(out_path, **out)
    print(f"wrote {len(out)} arrays to {out_path}")


if __name__ == "__main__":
    main()
