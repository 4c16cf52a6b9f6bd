"""Phases 2–7: importance, pruning masks, mask overlap, sample conflicts, QK-OV interference,
and Fisher-scaled optimisation / EWC / merging. Each module is a set of pure functions over
:class:`~fisherjax.fisher.TaskFisher` values."""
