"""The experiment of a RunSpec: its settings, units, engine task and summary (one class a run kind)."""

from __future__ import annotations

from harness.runs.spec import HierarchyTask, RunSpec


def experiment_for(spec: RunSpec, model: str):
    """The experiment of a spec (its settings resolved for the served model)."""
    if isinstance(spec.task, HierarchyTask):
        from harness.runs.hierarchy import HierarchyExperiment

        return HierarchyExperiment(spec, model)
    from harness.runs.classification import ClassificationExperiment

    return ClassificationExperiment(spec, model)
