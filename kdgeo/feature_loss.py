"""The paper's feature losses as a drop-in ``torch.nn.Module`` for a training loop you already have.

:class:`FeatureDistillationLoss` takes the hidden states of a student and a teacher (``output_hidden_states=True``)
and returns ``weight * mean_k L(X_k, Y_k)`` over the layer pairs k, where ``X_k`` and ``Y_k`` are the teacher's and
the student's feature rows of pair k and ``L`` is the kind's formula (:mod:`kdgeo.losses`):

- ``procrustes``: ``2 - 2 * ||X^T Y||_*`` on centred, unit-Frobenius X, Y (``form="angular"``: ``arccos``);
  Bhattarai et al. (2025), arXiv 2509.25253; Williams et al. (2021).
- ``gram``: ``||X X^T - Y Y^T||_F^2`` on centred, unit-Frobenius X, Y (arXiv 2509.25253).
- ``cka``: ``1 - CKA_linear(X, Y)``, Kornblith et al. (2019).
- ``projection``: ``mean((Y W + b - X)^2)`` with a learned map per pair (FitNets, Romero et al. 2015; TinyBERT,
  Jiao et al. 2020): its parameters are this module's, so give them to the optimizer.
- ``mse``, ``cosine``: element-wise, equal widths only.

Why a module and not a function: it is the same code ``kdgeo distill`` runs (rows by
:func:`kdgeo.features.select_rows`, the value by :meth:`kdgeo.losses.Objective.grouped`, the term built from
the spec's own loss table), so a number here means what it means in a run's metrics.jsonl; and the
projection kind owns trainable maps, which a module carries, moves with ``.to(device)`` and saves in its
``state_dict``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdgeo.errors import KdgeoError, LayerMapError, TokenizerMismatchError
from kdgeo.features import select_rows
from kdgeo.kinds import EQUAL_WIDTH_KINDS, FEATURE_KINDS, ROWS, Rows
from kdgeo.losses import LossTerm, Objective, at_least_float32

Widths = tuple[int, int] | Sequence[tuple[int, int]]
"""(d_student, d_teacher) for every pair, or one such tuple per pair."""


class FeatureDistillationLoss(nn.Module):
    """``weight * mean over pairs of L(teacher rows, student rows)``: distill's feature loss of one kind.

    Args:
        kind: ``"procrustes"``, ``"gram"``, ``"cka"``, ``"projection"``, ``"mse"`` or ``"cosine"``.
        pairs: ``[(student_index, teacher_index), ...]`` in hidden-state indices: 0 is the embedding output,
            i the output of layer i (``hidden_states[i]`` of a Hugging Face model), as ``features.pairs``.
        rows: what a row of a feature matrix is: ``"tokens"`` (every non-padding token; the two models must
            tokenize alike), ``"cls"`` (the first token per example) or ``"mean"`` (the mask-weighted mean over
            tokens per example), as ``features.rows``.
        weight: the term's weight, as a ``[[losses]]`` entry's ``weight``.
        widths: (d_student, d_teacher) for all pairs or per pair. Required for ``projection`` (its maps are
            made here, so the optimizer can be given them); otherwise optional. :meth:`for_models` reads them
            from the models.
        **options: the kind's own options as the spec has them: ``form="squared" | "angular"`` for procrustes.

    Raises :class:`kdgeo.errors.KdgeoError` for a kind, rows, pair, option or width that cannot work, naming it.

    The geometry kinds (procrustes, gram, cka) are statistics of the whole batch of rows: with ``rows="cls"``
    or ``"mean"`` a batch gives one row per example, and fewer than 3 rows mean nothing (the Procrustes loss
    is the constant 2 at one row and 0 at two); distill's spec refuses such batch sizes, here it is yours to
    keep the batch large enough.

    After each call, :attr:`last_values` holds the unweighted value of every pair (``"procrustes/2-6"``) and
    of the term (``"procrustes"``), detached, for logging.
    """

    def __init__(
        self,
        kind: str,
        pairs: Sequence[Sequence[int]],
        *,
        rows: Rows = "tokens",
        weight: float = 1.0,
        widths: Widths | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.rows: Rows = _check_rows(rows)
        self.pairs: list[tuple[int, int]] = _check_pairs(pairs)
        self.term = _term(kind, weight, options)
        self.weight = self.term.weight
        self.widths: list[tuple[int, int]] | None = _check_widths(widths, len(self.pairs))
        if kind == "projection" and self.widths is None:
            raise KdgeoError(
                'FeatureDistillationLoss(kind="projection") learns a linear map per pair, made here so that the '
                "optimizer can be given it: pass widths=(d_student, d_teacher) (or one per pair), or build it with "
                "FeatureDistillationLoss.for_models(student, teacher, ...)."
            )
        if kind in EQUAL_WIDTH_KINDS and self.widths is not None:
            _check_equal(kind, self.pairs, self.widths)
        # Widths matter to the objective only for projection maps and the equal-width check (done above):
        # without them, (0, 0) stands in and the real widths are checked on the first call.
        self.objective = Objective([self.term], self.pairs, self.widths or [(0, 0)] * len(self.pairs))
        self.last_values: dict[str, Tensor] = {}

    @classmethod
    def for_models(
        cls,
        student: nn.Module | Any,
        teacher: nn.Module | Any,
        kind: str,
        pairs: Sequence[Sequence[int]],
        **kwargs: Any,
    ) -> FeatureDistillationLoss:
        """The loss for these two models (or their configs): the widths of every pair read from their configs
        (:func:`kdgeo.models.hidden_widths`; OPT's last hidden state may be narrower than the others)."""
        from kdgeo.models import hidden_widths

        s_widths, t_widths = hidden_widths(student), hidden_widths(teacher)
        checked = _check_pairs(pairs)
        for s, t in checked:
            if s >= len(s_widths) or t >= len(t_widths):
                raise LayerMapError(
                    f"FeatureDistillationLoss: pair ({s}, {t}) is outside the models: the student has hidden states "
                    f"0..{len(s_widths) - 1} and the teacher 0..{len(t_widths) - 1} (0 = embeddings)."
                )
        widths = [(s_widths[s], t_widths[t]) for s, t in checked]
        return cls(kind, checked, widths=widths, **kwargs)

    def forward(
        self,
        student_hidden_states: Sequence[Tensor],
        teacher_hidden_states: Sequence[Tensor],
        attention_mask: Tensor,
        teacher_attention_mask: Tensor | None = None,
    ) -> Tensor:
        """The weighted loss, a scalar (float32, or float64 when the hidden states are).

        student_hidden_states[i]: (B, T_s, d_s) and teacher_hidden_states[i]: (B, T_t, d_t), as a Hugging Face
        model returns them with ``output_hidden_states=True``; attention_mask: (B, T_s) with 1 on real tokens
        (padding never makes a row). teacher_attention_mask: (B, T_t) when the teacher's input differs (another
        tokenizer: use pooled rows); by default the student's. Run the teacher under ``torch.no_grad()``.
        """
        s_mask = attention_mask
        t_mask = attention_mask if teacher_attention_mask is None else teacher_attention_mask
        self._check_inputs(student_hidden_states, teacher_hidden_states, s_mask, t_mask)
        s_rows = [select_rows(student_hidden_states[s], s_mask, self.rows) for s, _ in self.pairs]  # each (n, d_s)
        t_rows = [select_rows(teacher_hidden_states[t], t_mask, self.rows) for _, t in self.pairs]  # each (n, d_t)
        self._check_rows_agree(s_rows, t_rows)
        # Objective.grouped is distill's one path from rows to the loss; with feature terms only, the logits are
        # read for their dtype and device alone (its totals start as zeros of them), so an empty (0, 1) stands in.
        logits = s_rows[0].new_zeros((0, 1), dtype=at_least_float32(s_rows[0]).dtype)
        labels = torch.zeros(0, dtype=torch.long, device=logits.device)
        _, loss, parts = self.objective.grouped(logits, labels, None, t_rows, s_rows)
        self.last_values = parts
        return loss

    def extra_repr(self) -> str:
        form = ", form='angular'" if self.term.angular else ""
        return f"kind={self.kind!r}, pairs={self.pairs}, rows={self.rows!r}, weight={self.weight}{form}"

    # ---- checks: a wrong shape would otherwise surface as an index or matmul error deep in torch -------------

    def _check_inputs(
        self, student: Sequence[Tensor], teacher: Sequence[Tensor], s_mask: Tensor, t_mask: Tensor
    ) -> None:
        for who, hidden, mask, index in (
            ("student", student, s_mask, [s for s, _ in self.pairs]),
            ("teacher", teacher, t_mask, [t for _, t in self.pairs]),
        ):
            if isinstance(hidden, Tensor) or not isinstance(hidden, Sequence) or not hidden:
                raise KdgeoError(
                    f"FeatureDistillationLoss: the {who}'s hidden states must be the tuple a model returns with "
                    f"output_hidden_states=True (outputs.hidden_states), got {type(hidden).__name__}."
                )
            if max(index) >= len(hidden):
                raise LayerMapError(
                    f"FeatureDistillationLoss: pairs {self.pairs} need the {who}'s hidden state {max(index)}, but it "
                    f"has {len(hidden)} (0..{len(hidden) - 1}; 0 = embeddings). Use indices in range."
                )
            first = hidden[index[0]]
            if first.ndim != 3 or tuple(mask.shape) != tuple(first.shape[:2]):
                raise KdgeoError(
                    f"FeatureDistillationLoss: the {who}'s hidden states are {tuple(first.shape)} and its attention "
                    f"mask {tuple(mask.shape)}; pass (batch, tokens, width) states and the (batch, tokens) mask of "
                    "the same input"
                    + (" (teacher_attention_mask= for the teacher's)" if who == "teacher" else "")
                    + "."
                )
        widths = [(student[s].shape[-1], teacher[t].shape[-1]) for s, t in self.pairs]
        if self.widths is not None and widths != self.widths:
            raise KdgeoError(
                f"FeatureDistillationLoss: the hidden states have widths {widths} (student, teacher) per pair, but "
                f"the loss was built for {self.widths}; build it for these models (FeatureDistillationLoss.for_models)."
            )
        if self.kind in EQUAL_WIDTH_KINDS:
            _check_equal(self.kind, self.pairs, widths)

    def _check_rows_agree(self, s_rows: list[Tensor], t_rows: list[Tensor]) -> None:
        n_s, n_t = s_rows[0].shape[0], t_rows[0].shape[0]
        if n_s != n_t:  # only rows="tokens" can get here: pooled rows are one per example on both sides
            raise TokenizerMismatchError(
                f"FeatureDistillationLoss: rows='tokens' pairs token k of the teacher with token k of the student, "
                f"but the masks give {n_s} student and {n_t} teacher tokens. Give both models the same tokenized "
                "input, or use rows='mean' (or 'cls') to compare pooled features."
            )


def _check_rows(rows: str) -> Rows:
    if rows not in ROWS:
        raise KdgeoError(f"FeatureDistillationLoss: rows={rows!r} is not one of {', '.join(ROWS)}.")
    return rows  # type: ignore[return-value]  # checked against ROWS, the values of Rows


def _check_pairs(pairs: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    hint = "pass pairs=[(student_index, teacher_index), ...] in hidden-state indices (0 = embeddings), e.g. [(2, 6)]"
    if isinstance(pairs, str) or not isinstance(pairs, Sequence) or not pairs:
        raise LayerMapError(f"FeatureDistillationLoss: pairs={pairs!r}; {hint}.")
    out: list[tuple[int, int]] = []
    for pair in pairs:
        ok = isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
        if not ok or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in pair):
            raise LayerMapError(f"FeatureDistillationLoss: {pair!r} in pairs is not two indices of 0 or more; {hint}.")
        out.append((int(pair[0]), int(pair[1])))
    if len(set(out)) != len(out):
        raise LayerMapError(f"FeatureDistillationLoss: pairs {out} list the same pair twice; list each pair once.")
    return out


def _check_widths(widths: Widths | None, n: int) -> list[tuple[int, int]] | None:
    if widths is None:
        return None
    hint = "pass widths=(d_student, d_teacher) or one such tuple per pair"
    given: list[Any] = list(widths) if isinstance(widths, Sequence) and not isinstance(widths, str) else [widths]
    # (d_s, d_t) alone stands for every pair; a list of such tuples gives one per pair
    per_pair: list[Any] = [given] * n if len(given) == 2 and all(isinstance(w, int) for w in given) else given
    if len(per_pair) != n:
        raise KdgeoError(f"FeatureDistillationLoss: {len(per_pair)} widths for {n} pairs; {hint}.")
    out: list[tuple[int, int]] = []
    for w in per_pair:
        ok = isinstance(w, Sequence) and len(w) == 2
        if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in w):
            raise KdgeoError(f"FeatureDistillationLoss: widths entry {w!r} is not two positive sizes; {hint}.")
        out.append((int(w[0]), int(w[1])))
    return out


def _check_equal(kind: str, pairs: list[tuple[int, int]], widths: Sequence[tuple[int, int]]) -> None:
    bad = [(p, w) for p, w in zip(pairs, widths) if w[0] != w[1]]
    if bad:
        shown = ", ".join(f"{p} with widths {w}" for p, w in bad)
        raise KdgeoError(
            f"FeatureDistillationLoss(kind={kind!r}) compares element by element, so paired layers must be equally "
            f"wide: {shown}. Use kind='projection' (a learned map) or a geometry kind (procrustes, gram, cka)."
        )


def _term(kind: str, weight: float, options: dict[str, Any]) -> LossTerm:
    """The term as distill builds it: the spec's loss table checks kind, weight and options
    (:data:`kdgeo.spec.LOSS_CLASSES`), then :meth:`LossTerm.from_spec` takes the kind's options."""
    from pydantic import ValidationError

    from kdgeo.spec import LOSS_CLASSES

    if kind not in FEATURE_KINDS:
        what = "a logit loss (on the models' outputs, not hidden states)" if kind in LOSS_CLASSES else "not a loss"
        raise KdgeoError(
            f"FeatureDistillationLoss: kind={kind!r} is {what}; choose one of {', '.join(sorted(FEATURE_KINDS))}."
        )
    try:
        entry = LOSS_CLASSES[kind].model_validate({"kind": kind, "weight": weight, **options})
    except ValidationError as err:
        problems = []
        for e in err.errors(include_url=False):
            name = ".".join(str(p) for p in e["loc"]) or kind
            if e["type"] == "extra_forbidden":
                allowed = sorted(set(LOSS_CLASSES[kind].model_fields) - {"kind", "weight"})
                problems.append(f"{name} is not an option of {kind} (its options: {', '.join(allowed) or 'none'})")
            else:
                problems.append(f"{name}={e.get('input')!r}: {e['msg']}")
        raise KdgeoError(f"FeatureDistillationLoss(kind={kind!r}): {'; '.join(problems)}.") from None
    return LossTerm.from_spec(entry)  # type: ignore[arg-type]  # a member of the LossSpec union, by kind
