"""kdgeo.kinds: the one table of loss kinds, rows, precisions and metric directions."""

from __future__ import annotations

import typing

from kdgeo import comparison, geometry, kinds
from kdgeo import spec as spec_mod


def test_the_spec_validates_against_the_shared_kind_tables():
    """kdgeo.kinds is the one home of loss kinds, rows and precisions; the spec's classes and Literals name the same."""
    assert set(spec_mod.LOSS_CLASSES) == kinds.LOSS_KINDS
    assert spec_mod.GEOMETRY_LOSSES is kinds.GEOMETRY_LOSSES and spec_mod.MIN_GEOMETRY_ROWS == kinds.MIN_GEOMETRY_ROWS
    assert typing.get_args(spec_mod.FeaturesSpec.model_fields["rows"].annotation) == kinds.ROWS
    assert typing.get_args(spec_mod.TrainSpec.model_fields["precision"].annotation) == kinds.PRECISIONS


def test_metric_directions_are_read_from_the_table_everywhere():
    assert kinds.higher_is_better("accuracy") and kinds.higher_is_better("cka")
    assert not kinds.higher_is_better("perplexity") and not kinds.higher_is_better("procrustes")
    assert kinds.higher_is_better("a_metric_nobody_listed")  # the documented default
    for metric in geometry.METRIC_HIGHER_IS_BETTER:
        assert geometry.METRIC_HIGHER_IS_BETTER[metric] == kinds.METRIC_HIGHER_IS_BETTER[metric]
    assert comparison.higher_is_better is kinds.higher_is_better


def test_kind_sets_partition_the_losses():
    assert kinds.LOGIT_KINDS.isdisjoint(kinds.FEATURE_KINDS)
    assert kinds.GEOMETRY_LOSSES <= kinds.FEATURE_KINDS and kinds.EQUAL_WIDTH_KINDS <= kinds.FEATURE_KINDS
    assert kinds.LOSS_KINDS == kinds.LOGIT_KINDS | kinds.FEATURE_KINDS
