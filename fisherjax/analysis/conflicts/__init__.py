"""Phase 5: cross-task sample conflicts — which sample of task A pulls against which sample of
task B, where (layer, block, head), and whether it is more than noise.

Fisher-whitened cosines of every cross-task pair of per-sample gradients, split by parameter
group; p-values against the tasks' own within-task cosines; Benjamini–Hochberg FDR; effect
sizes, top pairs, clusters and recommendations. One concept per module, each importing only
the ones above it:

=====================  ====================================================================
:mod:`.sources`        per-sample gradients as grouped, chunked streams (TaskFisher,
                       SampleGrads, projected GroupedGrads, callables)
:mod:`._kernels`       the jitted chunk preparation and chunk-pair Gram (private by purpose)
:mod:`.gram`           whitening, damping, the :class:`Gram` and :func:`pairwise_cosines`,
                       effect sizes — the scores and their formulas
:mod:`.null`           :func:`conflict_pvalues`: the null hypothesis and its three tests
:mod:`.projection`     Kronecker random projections for models too large for exact Grams
:mod:`.options`        :class:`ConflictOptions`, checked once
:mod:`.group_tests`    the per-group scope's tests a few groups at a time, keeping those that
                       can be discoveries (:class:`~.group_tests.GroupTests`)
:mod:`.findings`       top pairs, clusters, recommendations
:mod:`.detect`         :func:`detect` as named steps, :class:`ConflictReport`, :func:`head_map`
=====================  ====================================================================

``conflicts.json``, the figure and the report's Markdown are :mod:`fisherjax.report.conflicts`.
"""

from fisherjax.analysis.conflicts import projection
from fisherjax.analysis.conflicts.detect import (
    GROUP_GRAM_BYTES, GROUP_TEST_CORE_SECONDS, GROUP_TEST_CORE_SECONDS_INDEPENDENT, GROUP_TEST_FIXED_BYTES, GROUP_TEST_STEP_BYTES,
    HOT_NULL_BYTES, KEPT_SHARE, KEPT_TEST_BYTES, NULL_TAIL_BYTES, ConflictReport, detect, group_scope_bytes, group_test_core_seconds,
    group_test_values, head_map, max_kept_tests,
)
from fisherjax.analysis.conflicts.findings import ConflictCluster, ConflictPair
from fisherjax.analysis.conflicts.gram import Gram, damping, effect_sizes, open_groups, pairwise_cosines, whiten
from fisherjax.analysis.conflicts.group_tests import GroupTests
from fisherjax.analysis.conflicts.null import NULLS, conflict_pvalues
from fisherjax.analysis.conflicts.options import ORTHOGONAL_EFFECT, REFERENCES, SCOPES, ConflictOptions
from fisherjax.analysis.conflicts.sources import GradChunk, GroupedGrads, GroupIndex, Grouping, Source, grouping_for

__all__ = [
    "GROUP_GRAM_BYTES",
    "GROUP_TEST_CORE_SECONDS",
    "GROUP_TEST_CORE_SECONDS_INDEPENDENT",
    "GROUP_TEST_FIXED_BYTES",
    "GROUP_TEST_STEP_BYTES",
    "HOT_NULL_BYTES",
    "KEPT_SHARE",
    "KEPT_TEST_BYTES",
    "NULL_TAIL_BYTES",
    "NULLS",
    "ORTHOGONAL_EFFECT",
    "REFERENCES",
    "SCOPES",
    "ConflictCluster",
    "ConflictOptions",
    "ConflictPair",
    "ConflictReport",
    "GradChunk",
    "Gram",
    "GroupIndex",
    "GroupTests",
    "GroupedGrads",
    "Grouping",
    "Source",
    "conflict_pvalues",
    "damping",
    "detect",
    "effect_sizes",
    "group_scope_bytes",
    "group_test_core_seconds",
    "group_test_values",
    "grouping_for",
    "head_map",
    "max_kept_tests",
    "open_groups",
    "pairwise_cosines",
    "projection",
    "whiten",
]
