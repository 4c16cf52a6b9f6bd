"""What the method comparison's passes hold, by XLA's memory analysis, for a model's config.json.

Compiles (for the parameters' shapes only: nothing is allocated) one weighted gradient pass
through every layer (``curvature.lowrank.pass_temporaries``) at ``rows × seq_len`` tokens and
prints its temporaries beside the three logits-sized arrays ``compare.working_bytes`` counts
without the samples' length; then, with ``--factors``, each unit's K-FAC factor pass
(``curvature.kfac.batch_factor_sums`` with its keys, whole and one layer), its products
(``curvature.groups.lowered_products``: whole, by two ranges of layers and a layer at a time) and
its gradient pass at one sample: what XLA says they hold and what ``curvature.groups`` with
``compare.working_bytes`` counts for them (marked where the count is lower).

Usage: python benchmarks/pass_memory.py CONFIG [CONFIG ...] [--seq-len 512] [--rows 1 4] [--factors]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from fisherjax.curvature import compare, groups, kfac, lowrank
from fisherjax.models.model import Model
from fisherjax.plan import read_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--factors", action="store_true", help="also each unit's K-FAC factor pass")
    args = parser.parse_args()
    for file in args.configs:
        model = Model.abstract(read_config(config_file=file))
        for rows in args.rows:
            start = time.time()
            temp = lowrank.pass_temporaries(model, rows, args.seq_len)
            logits = compare.working_bytes(model, rows * args.seq_len)
            print(f"{file}: gradient pass over {rows} × {args.seq_len} tokens: temporaries {temp / 1e9:.3f} GB, "
                  f"three logits arrays {logits / 1e9:.3f} GB ({time.time() - start:.1f} s to compile)")
        if not args.factors:
            continue
        ids = jax.ShapeDtypeStruct((1, args.seq_len), jnp.int32)
        row = jax.ShapeDtypeStruct((1,), jnp.int32)
        working = compare.working_bytes(model, args.seq_len, args.seq_len)
        for unit in groups.units(model):
            if not unit.keys:
                continue
            for layers in (None, (0, 1)):
                analysis = kfac.batch_factor_sums.lower(model, model.params, ids, ids, ids, row, jax.random.key(0), fisher_type="empirical",
                                                        true_samples=1, keys=unit.keys, layers=layers).compile().memory_analysis()
                group = unit.by_ranges(unit.layers) if layers else unit
                held = 2 * analysis.output_size_in_bytes + analysis.temp_size_in_bytes  # the batch's sums, the running sum, temporaries
                print(f"  {unit.paths[0]} factor pass ({'one layer' if layers else 'all layers'}): factors "
                      f"{analysis.output_size_in_bytes / 1e9:.2f} GB, temporaries {analysis.temp_size_in_bytes / 1e9:.2f} GB, held with "
                      f"the running sum {held / 1e9:.2f} GB; counted {(group.bytes + working) / 1e9:.2f} GB"
                      f"{'' if group.bytes + working >= held else '  UNDERCOUNTED'}")
            for group in (unit, unit.by_ranges(2), unit.by_ranges(unit.layers)):
                analysis = groups.lowered_products(model, group).compile().memory_analysis()
                held = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
                print(f"  {unit.paths[0]} products ({len(group.ranges) or 1} range(s) of layers): factors, D, probe and exact product "
                      f"{analysis.argument_size_in_bytes / 1e9:.2f} GB, temporaries {analysis.temp_size_in_bytes / 1e9:.2f} GB; counted "
                      f"{group.bytes / 1e9:.2f} GB{'' if group.bytes >= held else '  UNDERCOUNTED'}")
            analysis = lowrank.weighted_gradient_pass(model, unit.paths, 1, args.seq_len).compile().memory_analysis()
            held = analysis.output_size_in_bytes + analysis.temp_size_in_bytes
            counted = groups.GROUP_COPIES * unit.leaf_bytes + working  # its gradient is one of the copies
            print(f"  {unit.paths[0]} gradient pass: gradient {analysis.output_size_in_bytes / 1e9:.2f} GB, temporaries "
                  f"{analysis.temp_size_in_bytes / 1e9:.2f} GB; counted {counted / 1e9:.2f} GB{'' if counted >= held else '  UNDERCOUNTED'}")

if __name__ == "__main__":
    main()
