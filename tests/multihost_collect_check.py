"""Run by tests/test_multihost.py: ``python3 multihost_collect_check.py MODE OUT PROCESSES
PROCESS_ID PORT``. With PROCESSES = 1: one process, one device, no mesh. Else this process joins a
``jax.distributed`` run on localhost (CPU collectives over gloo) with two host devices, and
collects on a ("data",) mesh over every process's devices. MODE ``straight`` runs through;
``crash`` saves every 2 batches and SIGKILLs itself when batch 5 is asked for; ``resume``
continues from the saves. Writes ``OUT/result-<process>.npz``: the global results and this
process's share of the per-sample ones."""

from __future__ import annotations

import os
import signal
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"  # and the run's flags
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import random_task, tiny_config  # noqa: E402


def main(mode: str, out: str, processes: int, process_id: int, port: int) -> None:
    from fisherjax import sharding

    mesh = None
    if processes > 1:
        sharding.initialize_distributed(f"localhost:{port}", processes, process_id)
        mesh = sharding.run_mesh()
    from fisherjax import Model
    from fisherjax.data import batches
    from fisherjax.fisher.collect import collect
    from fisherjax.layout import flatten

    model = Model.init(tiny_config("llama"), seed=3)
    data = list(batches(random_task("r", 22, seed=9, prompt=2), 3))  # batches of 3 rows: one filler row per mesh step

    def feed():
        for i, batch in enumerate(data):
            if mode == "crash" and i == 5:
                os.kill(os.getpid(), signal.SIGKILL)  # die mid-run, after the save at batch 4
            yield batch

    fisher = collect(model, feed(), task="r", keep_sample_grads=True, diagonal=True, progress=False, mesh=mesh,
                     checkpoint_dir=None if mode == "straight" else os.path.join(out, "ckpt"), checkpoint_every=2,
                     resume=mode == "resume")
    arrays = {"groups|" + k: v for k, v in flatten(fisher.group_fisher).items()}
    arrays.update({"m2|" + k: np.asarray(v) for k, v in flatten(fisher.welford.m2).items()})
    arrays.update({"diagonal|" + k: v for k, v in fisher.diagonal.items()})
    arrays.update({"grads|" + k: np.asarray(v) for k, v in fisher.sample_grads.grads.items()})
    arrays["ids"] = fisher.sample_ids
    arrays["counts"] = np.array([fisher.n_samples, fisher.n_tokens, jax.process_count(), len(jax.devices())])
    # 64-bit values across processes, exactly (JAX without x64 would narrow them to 32 bits)
    arrays["least_bytes"] = sharding.process_min(np.array([5_000_000_000 + process_id, -process_id], np.int64))
    arrays["summed"] = sharding.process_sum(np.array([2.0**40 + 0.5], np.float64))
    arrays["gathered"] = sharding.gather_rows(np.arange(process_id, dtype=np.float64) + 2.0**40 + 0.5)  # process 0's share is empty
    arrays["none"] = sharding.gather_rows(np.zeros(0, np.int64))  # every share empty (no skipped samples)
    np.savez(os.path.join(out, f"result-{process_id}.npz"), **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
