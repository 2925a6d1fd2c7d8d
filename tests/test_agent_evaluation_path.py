"""Validation runs the whole model in order, whatever the training paths skip or swap."""

from __future__ import annotations

from lowband.node.pipeline.agent import PathSpec, Schedule, whole_model_path


def _schedule(*paths: PathSpec, stages: dict[str, int]) -> Schedule:
    return Schedule(epoch=1, paths=list(paths), stages=stages)


STAGES = {"o": 0, "a1": 1, "b1": 1, "a2": 2, "b2": 2, "a3": 3}


def test_a_skipped_stage_is_run_by_one_of_its_replicas_and_swaps_are_undone() -> None:
    skip_2 = PathSpec(0, (0, 1, 3, 0), ("o", "b1", "a3", "o"))
    swapped = PathSpec(1, (0, 2, 1, 3, 0), ("o", "b2", "b1", "a3", "o"))
    path = whole_model_path("o", 4, _schedule(skip_2, swapped, stages=STAGES))
    assert path == PathSpec(-1, (0, 1, 2, 3, 0), ("o", "b1", "b2", "a3", "o"))


def test_a_stage_no_path_visits_takes_its_first_replica() -> None:
    skip_2 = PathSpec(0, (0, 1, 3, 0), ("o", "a1", "a3", "o"))
    path = whole_model_path("o", 4, _schedule(skip_2, stages=STAGES))
    assert path is not None and path.node_ids == ("o", "a1", "a2", "a3", "o")


def test_without_a_node_for_some_stage_or_without_s_there_is_no_whole_path() -> None:
    skip_3 = PathSpec(0, (0, 1, 2, 0), ("o", "a1", "a2", "o"))
    assert whole_model_path("o", 4, _schedule(skip_3, stages={"o": 0, "a1": 1, "a2": 2})) is None
    assert whole_model_path("o", 0, _schedule(skip_3, stages=STAGES)) is None
