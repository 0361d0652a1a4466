"""Record torch's float32 `theta ** exponents` on the CPU, for `gemma4_eqx.layers.sleef_pow` (run with `.venv-hf`).

Only whole blocks of 32 exponents are recorded: torch computes those with SLEEF's vector `powf_u10` on every x86
CPU (AVX2 and AVX-512 kernels alike), so the fixture does not depend on the recording host. The tails (computed by
the C library's `powf`) are compared live by tests/test_config_transformers.py, on the test host itself.

    .venv-hf/bin/python scripts/record_torch_pow.py --out tests/fixtures/torch_pow.npz
"""

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="tests/fixtures/torch_pow.npz")
    args = parser.parse_args()
    rng = np.random.default_rng(20261207)
    thetas, exponents = [], []
    # the 12B's own tables: sliding (head_dim 256, theta 1e4) and full (head_dim 512, 64 rotated, theta 1e6)
    for theta, dim, rotated in [(10_000.0, 256, 128), (1_000_000.0, 512, 64)]:
        thetas.append(theta)
        exponents.append(torch.arange(0, 2 * rotated, 2, dtype=torch.int64).float() / dim)
    for theta in np.float32(10.0 ** rng.uniform(0.05, 8.0, 30)).tolist() + [1.5, 2.25, 3.0, 160_000.0]:
        thetas.append(float(theta))
        exponents.append(torch.tensor(rng.uniform(0.0, 1.0, 64), dtype=torch.float32))
    exps = torch.stack([e[:64] if e.numel() >= 64 else torch.cat([e, e]) for e in exponents])
    powers = torch.stack([theta ** e for theta, e in zip(thetas, exps)])
    np.savez(args.out, thetas=np.array(thetas, np.float64), exponents=exps.numpy(), powers=powers.numpy(),
             sliding_12b=(1.0 / (10_000.0 ** exponents[0])).numpy(),
             full_12b=(1.0 / (1_000_000.0 ** exponents[1])).numpy(),
             torch_version=np.array(torch.__version__), cpu_capability=np.array(torch.backends.cpu.get_cpu_capability()))
    print(f"wrote {args.out}: {len(thetas)} bases x 64 exponents ({torch.__version__}, {torch.backends.cpu.get_cpu_capability()})")


if __name__ == "__main__":
    main()
