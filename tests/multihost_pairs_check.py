"""Run by tests/test_multihost.py: ``python3 multihost_pairs_check.py OUT PROCESS_ID PORT``. Two
processes on localhost (``jax.distributed``, gloo), two host devices each: the pair phases on a
("data",) mesh over all four devices against the same phases on this process's one device.
Writes ``OUT/pairs-<process>.json`` with the largest differences."""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"  # and the run's flags
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import random_task, tiny_config  # noqa: E402


def main(out: str, process_id: int, port: int) -> None:
    from fisherjax import sharding

    sharding.initialize_distributed(f"localhost:{port}", 2, process_id)
    mesh = sharding.run_mesh()
    import jax

    from fisherjax import Model
    from fisherjax.analysis import conflicts, qkov
    from fisherjax.curvature import kfac
    from fisherjax.data import batches
    from fisherjax.fisher.collect import collect

    one = jax.local_devices()[0]
    with jax.default_device(one):  # the tasks and the references on this process's first device
        model = Model.init(tiny_config("gpt2"), seed=3)
        fa, fb = (collect(model, batches(random_task(n, size, seed=k), 4), task=n, keep_sample_grads=True, progress=False)
                  for k, (n, size) in enumerate((("a", 17), ("b", 10))))  # A's held-out fit half needs 8 for its Fisher
        fit, held = qkov.heldout_split(fa, 0.5, seed=0)
        reference = (qkov.heatmap(fa, fb, model.layout), conflicts.detect(fa, fb, layout=model.layout, scope="groups"),
                     qkov.permutation_test(fit, fb, held, model.layout, n_permutations=200))
        # the same tasks with their kernels kept as token factors, and A's K-FAC for the kfac variant
        ga, gb = (collect(model, batches(random_task(n, size, seed=k), 4), task=n, keep_sample_grads=True, sample_grads_factors=True,
                          progress=False) for k, (n, size) in enumerate((("a", 17), ("b", 10))))
        kf = kfac.attention_factors(kfac.kfac_factors(model, model.params, list(batches(random_task("a", 17, seed=0), 4))), model.layout)
        kfac_reference = qkov.heatmap(fa, fb, model.layout, variant="kfac", kfac=kf)
    sharded = (qkov.heatmap(fa, fb, model.layout, mesh=mesh), conflicts.detect(fa, fb, layout=model.layout, scope="groups", mesh=mesh),
               qkov.permutation_test(fit, fb, held, model.layout, n_permutations=200, mesh=mesh))
    factored = (qkov.heatmap(ga, gb, model.layout, mesh=mesh), conflicts.detect(ga, gb, layout=model.layout, scope="groups", mesh=mesh))
    kfac_sharded = qkov.heatmap(ga, gb, model.layout, variant="kfac", kfac=kf, mesh=mesh)

    def rel(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300))

    (h1, c1, p1), (h2, c2, p2) = reference, sharded
    found = {
        "devices": len(mesh.devices.flat),
        "scores": rel(h2.scores, h1.scores),
        "layer_head_avg": rel(h2.layer_head_avg, h1.layer_head_avg),
        "cosines": rel(c2.cosines, c1.cosines),
        "same_conflict_pvalues": bool(np.allclose(c2.pvalues, c1.pvalues, rtol=1e-6, atol=0, equal_nan=True)),  # NaN: no group p ≤ alpha
        "observed": rel(p2.observed, p1.observed),
        "same_permutation_pvalues": bool(np.array_equal(p2.pvalues, p1.pvalues)),
        # kept factors formed on each process's devices, against the gradients on one device
        "factors_scores": rel(factored[0].scores, h1.scores),
        "factors_cosines": rel(factored[1].cosines, c1.cosines),
        "kfac_scores": rel(kfac_sharded.scores, kfac_reference.scores),
    }
    with open(os.path.join(out, f"pairs-{process_id}.json"), "w") as f:
        json.dump(found, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
