"""Run config validation and the rule that refuses result-altering changes on a run with memory."""

from __future__ import annotations

import pytest

from meds_service.core.config import RunConfig, stored_columns
from meds_service.core.errors import Conflict, InvalidInput
from meds_service.core.types import Group


@pytest.mark.parametrize(
    "values",
    [
        {"alpha": -1},
        {"beta": float("nan")},
        {"alpha": "0.1"},
        {"alpha": True},
        {"knn_k": 0},
        {"knn_k": 65},
        {"knn_k": 2.5},
        {"min_cluster_size": 1},
        {"min_samples": 0},
        {"last_n_layers": 0},
        {"max_memory_per_key": 1},
        {"dim": 0},
        {"penalty_target": "right"},
        {"noise_policy": "drop"},
        {"consistency": "eventual"},
        {"knn_metric": "euclidean"},
        {"cluster_selection_method": "x"},
        {"layer_diff": "yes"},
        {"layer_diff": True, "dim": 1},
        {"cluster_selection_epsilon": -0.5},
        {"last_n_layers": 14, "dim": 3},
        {"last_n_layers": 14, "layer_diff": True, "dim": 14},
    ],
)
def test_invalid_values_are_refused(values: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        RunConfig.from_mapping(values)


def test_an_explicit_dim_must_cover_last_n_layers() -> None:
    with pytest.raises(InvalidInput, match="dim 3 is too small for last_n_layers 14: it needs at least 14"):
        RunConfig(last_n_layers=14, dim=3)
    assert RunConfig(last_n_layers=14, dim=14).stored_dim == 14
    assert RunConfig(last_n_layers=14, layer_diff=True, dim=15).stored_dim == 15


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(InvalidInput, match="unknown config fields: colour"):
        RunConfig.from_mapping({"colour": "blue"})


def test_changes_on_a_run_with_memory() -> None:
    config = RunConfig(dim=14)
    assert config.updated({"alpha": 0.2, "beta": 0.3, "penalty_target": "both"}, has_memory=True).alpha == 0.2
    assert config.updated({"dim": 14}, has_memory=True) == config  # same value: no change
    with pytest.raises(Conflict, match="knn_k"):
        config.updated({"knn_k": 5}, has_memory=True)
    with pytest.raises(Conflict, match="dim"):
        config.updated({"dim": 15}, has_memory=True)
    assert config.updated({"knn_k": 5, "dim": 15}, has_memory=False).knn_k == 5


def test_stored_columns_keep_exactly_what_features_need() -> None:
    assert stored_columns(28, False, None) == 28
    assert stored_columns(28, False, 14) == 14
    assert stored_columns(28, True, 14) == 15
    assert stored_columns(28, True, None) == 28
    assert stored_columns(10, False, 14) == 10  # shorter than last_n: kept whole, as the reference does
    assert stored_columns(10, True, 14) == 10
    config = RunConfig(dim=28, layer_diff=True, last_n_layers=14)
    assert (config.stored_dim, config.feature_dim) == (15, 14)
    with pytest.raises(InvalidInput):
        _ = RunConfig().stored_dim


def test_fitted_groups_follow_the_target() -> None:
    assert RunConfig().fitted_groups() == {Group.WRONG, Group.UNKNOWN}
    assert RunConfig(penalty_target="both").fitted_groups() == set(Group)
    # wrong keys are always judged: error collapse is measured under every target, observe-only included
    assert RunConfig(penalty_target="correct").fitted_groups() == set(Group)
    assert RunConfig(penalty_target="none").fitted_groups() == {Group.WRONG}
    assert RunConfig(penalty_target="correct").sized_groups() == {Group.CORRECT, Group.UNKNOWN}
    assert RunConfig(penalty_target="none").sized_groups() == set()
