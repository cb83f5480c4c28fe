"""A fused block as vLLM's ``prompt_logprobs``: per position, the top-K fused entries and the
actual token, as log-probabilities with vLLM's ranks, at a temperature; and their JSON text.

Definitions (row ``i - 1`` of a block predicts token ``i``; position 0 has no entry, ``null``):

- **Temperature** T reshapes a row over what it knows: its listed entries p_j and its tail t
  (the mass on no listed id), the tail taken as one outcome: q_j = p_j^(1/T) / Z and
  t' = t^(1/T) / Z with Z = sum_j p_j^(1/T) + t^(1/T). T = 1 changes nothing (no arithmetic).
- **The actual token** is always present: its listed q when the row lists it; else the fused
  probability that the text goes on with its characters, as far as the row tells: the q of the
  listed entries whose text starts with the actual token's text and is longer (e.g. ``}}`` for a
  sampled ``}``), plus its even share of the tail over the ids the row does not list,
  t' / (V - L). 0 when neither exists (a special token, or a row without tail and without such
  entries), which vLLM's own clamp writes as -9999.0.
- **Ranks** as vLLM gives them: the top-K entries are ranked 1..K in order (most probable first);
  the actual token's rank is the number of entries at least as probable as it, itself included
  (ties rank last). An unlisted actual token with a probability is one of the row's entries for
  this (after the listed ones on a tie), so it is among the top-K when it is that probable; with
  probability 0 it ranks after every listed entry. When the actual token is among the top-K its
  entry is that top-K entry.
- ``decoded_token``: the token's own text (``TokenizerView.surfaces``, stray bytes as U+FFFD,
  specials as their literal), as vLLM decodes a single id.

Shapes: block rows [n, width], ``top_ids`` / ``top_logprobs`` [n - 1, K'] (K' <= K: fewer when
rows list fewer), ``actual_*`` [n - 1]. Pure: numpy and strings, no I/O.

Leaves out: HTTP, the request's validation and the fusing itself (``openai_api``, ``dataplane``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.wire.messages import FusedBlock

NEG_INF_LOGPROB = -9999.0  # what vLLM writes for a log-probability of -inf


@dataclass(frozen=True)
class PromptLogprobs:
    """One sequence's answer: ``actual_ids`` [m] the tokens at positions 1..m (m = n - 1) with
    their log-probabilities and ranks [m]; ``top_ids`` [m, K'] (-1: none) and
    ``top_logprobs`` [m, K'] the K' most probable fused entries of each position."""

    actual_ids: np.ndarray
    actual_logprobs: np.ndarray
    actual_ranks: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray
    actual_listed: np.ndarray  # [m] bool: the row lists the actual token

    def sources(self) -> dict[str, int]:
        """Positions by where the actual token's probability came from: ``listed`` (the row),
        ``tail`` (its share of the row's tail), ``zero`` (neither: written as -9999.0)."""
        zero = ~np.isfinite(self.actual_logprobs)
        listed = int(self.actual_listed.sum())
        return {"listed": listed, "tail": int((~zero).sum()) - listed, "zero": int(zero.sum())}


def tempered(probs: np.ndarray, tail: np.ndarray, temperature: float):
    """(q [n, width], t' [n]): rows reshaped by ``temperature`` (module docstring); float64."""
    probs = probs.astype(np.float64)
    tail = tail.astype(np.float64)
    if temperature == 1.0:
        return probs, tail
    power = 1.0 / temperature
    with np.errstate(divide="ignore", under="ignore", over="ignore"):
        w = np.where(probs > 0, np.power(probs, power), 0.0)
        w_tail = np.where(tail > 0, np.power(tail, power), 0.0)
        z = w.sum(axis=1) + w_tail
        z = np.where(z > 0, z, 1.0)
    return w / z[:, None], w_tail / z


def continuing(view: TokenizerView, ids: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """[m, width] bool: entries ``ids`` [m, width] whose text is longer than, and starts with,
    the text of their row's ``actual`` [m] token (never for a token that stands for no text)."""
    nbytes = view.surface_nbytes
    a_len = nbytes[actual]
    width = int(a_len.max(initial=0))
    if width == 0:
        return np.zeros(ids.shape, dtype=bool)
    matrix = view.surface_byte_matrix
    if matrix.shape[1] < width:
        matrix = np.pad(matrix, ((0, 0), (0, width - matrix.shape[1])))
    safe = np.maximum(ids, 0)
    beyond = np.arange(width)[None, :] >= a_len[:, None]  # [m, width]: past the actual's text
    same = (matrix[safe, :width] == matrix[actual, :width][:, None, :]) | beyond[:, None, :]
    out: np.ndarray = same.all(axis=-1) & (nbytes[safe] > a_len[:, None]) & (a_len[:, None] > 0)
    return out


def prompt_logprobs(
    block: FusedBlock, top: int, temperature: float, view: TokenizerView
) -> PromptLogprobs:
    """The vLLM view of ``block`` (module docstring): ``top`` = K entries per position."""
    ids = block.ids[:-1].astype(np.int64)
    listed = (ids >= 0) & (block.probs[:-1] > 0)
    q, tail = tempered(np.where(listed, block.probs[:-1], 0.0), block.tail_mass[:-1], temperature)
    actual = block.target_ids[1:].astype(np.int64)
    m = len(actual)
    hit = listed & (ids == actual[:, None])
    in_row = hit.any(axis=1)
    n_listed = listed.sum(axis=1)
    spread = tail / np.maximum(1, view.vocab_size - n_listed)
    missing = np.nonzero(~in_row)[0]
    onward = np.zeros(m)
    if len(missing):
        longer = continuing(view, ids[missing], actual[missing]) & listed[missing]
        onward[missing] = (q[missing] * longer).sum(axis=1)
    p_actual = np.where(in_row, (q * hit).sum(axis=1), onward + spread)
    # an unlisted actual token with a probability joins its row's entries (last: ties go to the
    # listed ones), so the top-K and the ranks are by probability over the same entries
    extra = np.where(~in_row & (p_actual > 0), p_actual, -1.0)
    key = np.concatenate([np.where(listed, q, -1.0), extra[:, None]], axis=1)
    every = np.concatenate([ids, actual[:, None]], axis=1)
    rank = (key >= p_actual[:, None]).sum(axis=1) + (p_actual <= 0)
    order = np.argsort(-key, axis=1, kind="stable")[:, : max(top, 0)]
    top_q = np.take_along_axis(key, order, axis=1)
    top_ids = np.where(top_q >= 0, np.take_along_axis(every, order, axis=1), -1)
    with np.errstate(divide="ignore"):
        return PromptLogprobs(
            actual_ids=actual,
            actual_logprobs=np.log(p_actual).reshape(m),
            actual_ranks=rank.astype(np.int64),
            top_ids=top_ids,
            top_logprobs=np.log(np.where(top_q >= 0, top_q, 0.0)),
            actual_listed=in_row,
        )


@lru_cache(maxsize=4)
def _decoded_json(view: TokenizerView) -> tuple[str, ...]:
    """Each id's ``decoded_token`` as a JSON string literal (cached per vocabulary)."""
    out = []
    for i, surface in enumerate(view.surfaces):
        text = view.tokens[i] if view.is_special[i] else surface
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        out.append(json.dumps(text))
    return tuple(out)


def _number(value: float) -> str:
    return repr(float(value)) if value > NEG_INF_LOGPROB else repr(NEG_INF_LOGPROB)


def _entry(token: int, logprob: float, rank: int, decoded: tuple[str, ...]) -> str:
    return (
        f'"{token}":{{"logprob":{_number(logprob)},"rank":{rank},"decoded_token":{decoded[token]}}}'
    )


def render_json(answer: PromptLogprobs, view: TokenizerView) -> str:
    """``answer`` as the JSON text of vLLM's ``prompt_logprobs`` list: ``null`` for position 0,
    then per position an object token-id string -> {logprob, rank, decoded_token}."""
    decoded = _decoded_json(view)
    parts = ["null"]
    top_ids = answer.top_ids.tolist()
    top_lp = answer.top_logprobs.tolist()
    for i, token in enumerate(answer.actual_ids.tolist()):
        entries = []
        seen = False
        for r, (tid, lp) in enumerate(zip(top_ids[i], top_lp[i]), start=1):
            if tid < 0:
                break
            seen = seen or tid == token
            entries.append(_entry(tid, lp, r, decoded))
        if not seen:
            lp, rank = float(answer.actual_logprobs[i]), int(answer.actual_ranks[i])
            entries.insert(0, _entry(token, lp, rank, decoded))
        parts.append("{" + ",".join(entries) + "}")
    return "[" + ",".join(parts) + "]"
