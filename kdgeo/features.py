"""Which hidden states are compared, and which rows the feature matrices have.

A *layer pair* is ``(student_index, teacher_index)`` in hidden-state indices (0 = embedding
output, i = output of layer i). A feature matrix has one row per non-padding token
(``rows="tokens"``) or per example (``"cls"``, ``"mean"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kdgeo.errors import LayerMapError, TokenizerMismatchError
from kdgeo.kinds import Rows as Rows  # its one home; re-exported for probe and distill

LayerPair = tuple[int, int]


def select_rows(hidden: Tensor, mask: Tensor, rows: Rows) -> Tensor:
    """Feature rows of one layer's hidden states.

    hidden: (B, T, d); mask: (B, T) with 1 on real tokens. Returns (n, d) with n = number of real
    tokens for ``tokens`` and n = B for ``cls`` / ``mean`` (mask-weighted mean over tokens).
    """
    if rows == "tokens":
        return hidden[mask.bool()]  # (n_tokens, d)
    if rows == "cls":
        return hidden[:, 0]  # (B, d)
    if rows == "mean":
        keep = mask.bool().unsqueeze(-1)  # (B, T, 1)
        # masked_fill, not a multiply by 0: a non-finite value at a masked position must not leak in.
        total = hidden.masked_fill(~keep, 0).sum(1)  # (B, d)
        return total / keep.sum(1).clamp_min(1).to(hidden.dtype)  # (B, d)
    raise ValueError(f"unknown rows {rows!r}")


def uniform_pairs(student_layers: int, teacher_layers: int) -> list[LayerPair]:
    """Student layer i -> teacher layer round(i * L_t / L_s), for i = 1..L_s."""
    return [(i, round(i * teacher_layers / student_layers)) for i in range(1, student_layers + 1)]


def resolve_layer_pairs(
    pairs: str | Sequence[Sequence[int]], student_layers: int, teacher_layers: int, where: str = "features.pairs"
) -> list[LayerPair]:
    """Turn ``uniform`` / ``last`` / an explicit list into checked (student, teacher) pairs.

    ``probe`` is resolved by the engine from measured similarities (see :func:`suggest_layer_map`).
    """
    if pairs == "uniform":
        return uniform_pairs(student_layers, teacher_layers)
    if pairs == "last":
        return [(student_layers, teacher_layers)]
    if isinstance(pairs, str):
        raise ValueError(f"unresolved layer pairs {pairs!r}")
    if not pairs:
        raise LayerMapError(f'{where} is empty; list [student, teacher] pairs, or use "uniform", "last" or "probe".')
    out: list[LayerPair] = []
    problems = []
    for s, t in pairs:
        if not 0 <= s <= student_layers:
            problems.append(f"[{s}, {t}]: student index {s} is outside 0..{student_layers}")
        elif not 0 <= t <= teacher_layers:
            problems.append(f"[{s}, {t}]: teacher index {t} is outside 0..{teacher_layers}")
        else:
            out.append((int(s), int(t)))
    if problems:
        raise LayerMapError(
            f"{where}: impossible layer pair(s): {'; '.join(problems)}. Indices are hidden-state indices "
            f"(0 = embeddings, i = output of layer i): the student has {student_layers} layers and the teacher "
            f'{teacher_layers}. Use pairs = "uniform" or indices in range.'
        )
    if len(set(out)) != len(out):
        raise LayerMapError(f"{where}: the same layer pair is listed twice in {list(pairs)}; list each pair once.")
    return out


def suggest_layer_map(table: Tensor, higher_is_better: bool, include_embeddings: bool = False) -> list[LayerPair]:
    """The monotone student -> teacher layer map that maximises total similarity.

    table: (L_t + 1, L_s + 1) metric values indexed [teacher, student] by hidden-state index.
    Student layers s = 1..L_s (0 too with ``include_embeddings``) are mapped to teacher layers
    t(s) with t strictly increasing in s when there are enough teacher layers (non-decreasing
    otherwise), maximising sum_s score(t(s), s) where score is the metric (or minus a distance).
    Dynamic programme: best[i, j] = score(j, s_i) + max_{j' < j} best[i - 1, j'], O(L_s L_t^2).
    """
    score = table.double() if higher_is_better else -table.double()  # (L_t+1, L_s+1)
    score = torch.nan_to_num(score, nan=-1e18)
    first = 0 if include_embeddings else 1
    students = list(range(first, table.shape[1]))
    teachers = list(range(first, table.shape[0]))
    if not students:
        return []
    strict = len(teachers) >= len(students)
    neg = float("-inf")
    n_s, n_t = len(students), len(teachers)
    best = [[neg] * n_t for _ in range(n_s)]
    back = [[-1] * n_t for _ in range(n_s)]
    for j in range(n_t):
        best[0][j] = float(score[teachers[j], students[0]])
    for i in range(1, n_s):
        running, arg = neg, -1
        for j in range(n_t):
            # predecessors j' < j (strict) or j' <= j (non-decreasing)
            if not strict and best[i - 1][j] > running:
                running, arg = best[i - 1][j], j
            if running > neg:
                best[i][j] = running + float(score[teachers[j], students[i]])
                back[i][j] = arg
            if strict and best[i - 1][j] > running:
                running, arg = best[i - 1][j], j
    j = max(range(n_t), key=lambda k: best[n_s - 1][k])
    chosen = [0] * n_s
    for i in range(n_s - 1, -1, -1):
        chosen[i] = j
        j = back[i][j]
    return [(students[i], teachers[chosen[i]]) for i in range(n_s)]


def check_tokenizers_agree(teacher_tok: Any, student_tok: Any, texts: Sequence[str], hint: str) -> None:
    """Token-level rows pair token k of the teacher with token k of the student; they must match.

    Raises TokenizerMismatchError quoting the first text the two tokenizers split differently.
    """
    for text in texts:
        t_ids = teacher_tok(text, truncation=True, max_length=512)["input_ids"]
        s_ids = student_tok(text, truncation=True, max_length=512)["input_ids"]
        t_tokens = teacher_tok.convert_ids_to_tokens(t_ids)
        s_tokens = student_tok.convert_ids_to_tokens(s_ids)
        if t_tokens != s_tokens:
            short = text if len(text) <= 60 else text[:57] + "..."
            raise TokenizerMismatchError(
                f"Teacher and student tokenizers split text differently, so token-level features cannot be "
                f"paired row by row: {short!r} is {len(t_tokens)} teacher tokens {_show_tokens(t_tokens)} but "
                f"{len(s_tokens)} student tokens {_show_tokens(s_tokens)}. {hint}"
            )


def _show_tokens(tokens: Sequence[str]) -> str:
    shown = " ".join(tokens[:8])
    return f"[{shown}{' ...' if len(tokens) > 8 else ''}]"
