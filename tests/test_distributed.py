"""Two JAX processes (`jax.distributed` on localhost, CPU, gloo collectives): a sharded load, forward and gradient
step across processes equal one process. The processes run `tests/distributed_checks.py` (which says how)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_checks.py"), str(i), str(port),
                               str(out / f"{i}.json")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            raise AssertionError(f"distributed_checks.py failed:\n{log[-4000:]}")
    return [json.loads((out / f"{i}.json").read_text()) for i in range(2)]


def test_two_processes_share_one_mesh(results):
    for i, r in enumerate(results):
        assert r["process_id"] == i and r["process_count"] == 2 and r["global_devices"] == 4
        assert r["mesh"] == {"fsdp": 2, "tp": 2} and r["params_on_global_mesh"]


def test_sharded_forward_across_processes_equals_one_process(results):
    for r in results:  # float64: only the reduction order differs
        assert r["logits_max_diff"] <= 1e-10 * max(1.0, r["logits_scale"])


def test_sharded_gradient_step_across_processes_equals_one_process(results):
    for r in results:
        assert r["loss_diff"] <= 1e-12
        assert r["updated_weight_max_diff"] <= 1e-12
