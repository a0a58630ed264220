"""kdgeo.FeatureDistillationLoss: parity with distill's own step loss, masks, trainable maps, errors."""

from __future__ import annotations

import pytest
import torch
from kdgeo import data as data_mod
from kdgeo import distributed, events
from kdgeo.errors import KdgeoError, LayerMapError, TokenizerMismatchError
from kdgeo.feature_loss import FeatureDistillationLoss
from kdgeo.kinds import FEATURE_KINDS
from kdgeo.losses import LossTerm, Objective
from kdgeo.models import build_student
from kdgeo.plan import make_plan
from kdgeo.spec import validate_spec
from kdgeo.step_loss import StepLoss
from kdgeo.teacher import prepare

from cli_helpers import tiny_spec

CPU = torch.device("cpu")
PAIRS = ((1, 2), (2, 4))
ROWS_OF_BATCH = [0, 5, 9, 11, 17, 23]


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """distill's plan, teacher and student for the tiny models (student: the teacher's layers 2 and 4, width 64)."""
    tmp = tmp_path_factory.mktemp("feature_loss")
    plan = make_plan(validate_spec(tiny_spec(tiny, tmp)), 1, False, events.ignore)
    teacher = prepare(plan, distributed.SINGLE, CPU, None, None, events.ignore).model
    student = build_student(plan, teacher, CPU, None)
    return plan, teacher, student


def _distill_term(tiny, tmp_path, loss):
    """The term exactly as distill builds it from a validated spec's [[losses]] entry."""
    spec = validate_spec(tiny_spec(tiny, tmp_path, losses=[loss]))
    return LossTerm.from_spec(spec.losses[0])


@pytest.mark.parametrize(
    "loss, rows",
    [
        ({"kind": "procrustes", "weight": 0.7}, "tokens"),
        ({"kind": "procrustes", "form": "angular"}, "mean"),
        ({"kind": "gram", "weight": 2.0}, "tokens"),
        ({"kind": "cka"}, "cls"),
        ({"kind": "projection", "weight": 0.5}, "tokens"),
        ({"kind": "mse"}, "mean"),
        ({"kind": "cosine", "weight": 0.3}, "tokens"),
    ],
    ids=lambda v: v["kind"] + ("-angular" if v.get("form") else "") if isinstance(v, dict) else v,
)
def test_equals_distills_step_loss_exactly(built, tiny, tmp_path, loss, rows):
    plan, teacher, student = built
    term = _distill_term(tiny, tmp_path, loss)
    widths = [(plan.s_widths[s], plan.t_widths[t]) for s, t in PAIRS]
    objective = Objective([term], list(PAIRS), widths)
    step = StepLoss(student, teacher, objective, plan.task, PAIRS, rows, CPU, None, None, None, None, False,
                    distributed.SINGLE)
    batch = data_mod.collate(plan.train, ROWS_OF_BATCH)
    assert (batch["student"]["attention_mask"] == 0).any()  # padding is in play
    torch.manual_seed(0)
    _, want, parts = step(batch)

    options = {k: v for k, v in loss.items() if k != "kind"}
    loss_fn = FeatureDistillationLoss(loss["kind"], PAIRS, rows=rows, widths=widths, **options)
    if loss["kind"] == "projection":
        loss_fn.objective.load_state_dict(objective.state_dict())  # the same maps on both sides
    torch.manual_seed(0)
    s_out = student(**batch["student"], output_hidden_states=True)
    with torch.no_grad():
        t_out = teacher(**batch["teacher"], output_hidden_states=True)
    got = loss_fn(s_out.hidden_states, t_out.hidden_states, batch["student"]["attention_mask"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert set(loss_fn.last_values) == {k for k in parts if k.startswith(loss["kind"])}
    for key, value in loss_fn.last_values.items():
        torch.testing.assert_close(value, parts[key], rtol=0, atol=0)
    got.backward()  # the loss trains the student
    assert student.bert.encoder.layer[0].attention.self.query.weight.grad is not None
    student.zero_grad()


def _padded_batch(seed: int = 0, d_s: int = 8, d_t: int = 12):
    """Hidden states (3 layers) of a right-padded batch of 5 examples, 9 positions, and its mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 6, 2, 7])
    mask = (torch.arange(9)[None, :] < lengths[:, None]).long()  # (5, 9)
    student = [torch.randn(5, 9, d_s, generator=g, dtype=torch.float64) for _ in range(3)]
    teacher = [torch.randn(5, 9, d_t, generator=g, dtype=torch.float64) for _ in range(3)]
    return student, teacher, mask


@pytest.mark.parametrize("poison", [float("nan"), 1e6])
@pytest.mark.parametrize("rows", ["tokens", "mean", "cls"])
@pytest.mark.parametrize("kind", ["procrustes", "gram", "cka", "projection"])
def test_padded_positions_never_count(kind, rows, poison):
    student, teacher, mask = _padded_batch()
    loss_fn = FeatureDistillationLoss(kind, [(1, 1), (2, 2)], rows=rows, widths=(8, 12)).double()
    clean = loss_fn(student, teacher, mask)

    pad = ~mask.bool()  # (5, 9)
    poisoned_s = [h.clone().masked_fill(pad[..., None], poison).requires_grad_() for h in student]
    poisoned_t = [h.clone().masked_fill(pad[..., None], poison) for h in teacher]
    dirty = loss_fn(poisoned_s, poisoned_t, mask)
    assert torch.isfinite(dirty)
    torch.testing.assert_close(dirty, clean, rtol=1e-12, atol=1e-12)  # same rows; only summation order may move
    dirty.backward()
    for h in poisoned_s[1:]:
        assert torch.isfinite(h.grad).all()
        assert (h.grad[pad] == 0).all()  # padding gets no gradient


def test_projection_maps_are_trainable_parameters():
    student, teacher, mask = _padded_batch(d_s=8, d_t=12)
    loss_fn = FeatureDistillationLoss("projection", [(1, 1), (2, 2)], rows="tokens", widths=[(8, 12), (8, 12)]).double()
    params = list(loss_fn.parameters())
    assert [tuple(p.shape) for p in params] == [(12, 8), (12,), (12, 8), (12,)]
    optimizer = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    before = float(loss_fn(student, teacher, mask).detach())
    for _ in range(5):
        optimizer.zero_grad()
        loss_fn(student, teacher, mask).backward()
        optimizer.step()
    assert float(loss_fn(student, teacher, mask).detach()) < before
    for kind in sorted(FEATURE_KINDS - {"projection"}):
        assert list(FeatureDistillationLoss(kind, [(1, 1)], widths=(8, 8)).parameters()) == []


def test_weight_scales_and_float64_stays_float64():
    student, teacher, mask = _padded_batch()
    one = FeatureDistillationLoss("procrustes", [(1, 2)], rows="tokens")(student, teacher, mask)
    three = FeatureDistillationLoss("procrustes", [(1, 2)], rows="tokens", weight=3.0)(student, teacher, mask)
    assert one.dtype == torch.float64
    torch.testing.assert_close(three, 3 * one)
    f32 = FeatureDistillationLoss("procrustes", [(1, 2)])([h.float() for h in student], [h.float() for h in teacher],
                                                          mask)
    assert f32.dtype == torch.float32


def test_for_models_reads_the_widths(tiny):
    from transformers import AutoConfig

    student, teacher = AutoConfig.from_pretrained(tiny["student"]), AutoConfig.from_pretrained(tiny["teacher"])
    loss_fn = FeatureDistillationLoss.for_models(student, teacher, "projection", [(1, 2), (2, 4)], rows="mean")
    assert loss_fn.widths == [(32, 64), (32, 64)]
    with pytest.raises(LayerMapError, match=r"student has hidden states 0\.\.2"):
        FeatureDistillationLoss.for_models(student, teacher, "gram", [(3, 4)])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "kd", "pairs": [(1, 1)]}, "is a logit loss"),
        ({"kind": "nope", "pairs": [(1, 1)]}, "is not a loss"),
        ({"kind": "gram", "pairs": [(1, 1)], "rows": "pooled"}, "rows='pooled' is not one of tokens, cls, mean"),
        ({"kind": "gram", "pairs": []}, "pairs=\\[\\]"),
        ({"kind": "gram", "pairs": [(1, 1), (1, 1)]}, "the same pair twice"),
        ({"kind": "gram", "pairs": [(1, -1)]}, "not two indices of 0 or more"),
        ({"kind": "gram", "pairs": [(1, 1)], "temperature": 2.0}, "temperature is not an option of gram"),
        ({"kind": "procrustes", "pairs": [(1, 1)], "form": "cubic"}, "form='cubic'"),
        ({"kind": "cka", "pairs": [(1, 1)], "weight": -1.0}, "weight=-1.0"),
        ({"kind": "projection", "pairs": [(1, 1)]}, "pass widths="),
        ({"kind": "mse", "pairs": [(1, 1)], "widths": (8, 12)}, "must be equally wide"),
        ({"kind": "gram", "pairs": [(1, 1), (2, 2)], "widths": [(8, 12)]}, "1 widths for 2 pairs"),
    ],
)
def test_bad_arguments_are_kdgeo_errors(kwargs, match):
    with pytest.raises(KdgeoError, match=match):
        FeatureDistillationLoss(**kwargs)


def test_bad_inputs_at_call_time_are_kdgeo_errors():
    student, teacher, mask = _padded_batch()
    with pytest.raises(LayerMapError, match="hidden state 5"):
        FeatureDistillationLoss("gram", [(5, 1)])(student, teacher, mask)
    with pytest.raises(KdgeoError, match="attention mask"):
        FeatureDistillationLoss("gram", [(1, 1)])(student, teacher, mask[:, :4])
    with pytest.raises(KdgeoError, match="tuple a model returns"):
        FeatureDistillationLoss("gram", [(1, 1)])(student[1], teacher, mask)
    with pytest.raises(KdgeoError, match="built for"):
        FeatureDistillationLoss("gram", [(1, 1)], widths=(8, 8))(student, teacher, mask)
    with pytest.raises(KdgeoError, match="equally wide"):
        FeatureDistillationLoss("cosine", [(1, 1)])(student, teacher, mask)
    other = mask.clone()
    other[1, 5] = 1  # the teacher's input has one more token than the student's
    with pytest.raises(TokenizerMismatchError, match="masks give 28 student and 29 teacher tokens"):
        FeatureDistillationLoss("gram", [(1, 1)])(student, teacher, mask, teacher_attention_mask=other)
    # Pooled rows: one per example on both sides, so another tokenization is fine.
    assert torch.isfinite(FeatureDistillationLoss("gram", [(1, 1)], rows="mean")(student, teacher, mask, other))
