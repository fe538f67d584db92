"""The initial design: diverse points, and cheap ones once costs are known.

The first warm-up points are a scrambled Sobol sequence (diverse by
construction). Once a few trials have reported their costs, each further
warm-up point is chosen from a small batch of Sobol candidates by elimination:
drop the candidate with the highest predicted cost, then the least novel one
(closest to a point already tried or running), and so on alternately until one
is left (the reference implementation's "cheap and diverse" design; CArBO's
cost-effective initial design follows the same idea). The survivor is in the
cheaper half and the more novel half of the batch, without a weight between
cost and novelty to tune.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cheap_and_diverse(candidates: Tensor, seen: Tensor, log_cost: Tensor) -> int:
    """Index of the candidate that survives alternate elimination.

    Args:
        candidates: ``Tensor[m, d]`` cube points, ``m >= 1``.
        seen: ``Tensor[n, d]``: points already tried or running (may be empty).
        log_cost: ``Tensor[m]``: predicted log cost of each candidate.

    Returns:
        The index (into ``candidates``) of the survivor. Rounds alternate,
        starting with the most expensive; ties drop the later candidate, so the
        result is deterministic.

    Example:
        >>> cands = torch.tensor([[0.1], [0.5], [0.9], [0.95]])
        >>> seen = torch.tensor([[0.0]])
        >>> cheap_and_diverse(cands, seen, torch.tensor([0.0, 5.0, 1.0, 1.0]))
        2
    """
    m = candidates.shape[0]
    if m == 0:
        raise ValueError("no candidates to choose from")
    if log_cost.shape != (m,):
        raise ValueError(f"log_cost must have shape ({m},), got {tuple(log_cost.shape)}")
    if seen.numel() and seen.shape[0] > 0:
        novelty = torch.cdist(candidates.to(torch.double), seen.to(torch.double)).min(-1).values
    else:
        novelty = torch.zeros(m, dtype=torch.double)
    cost = torch.nan_to_num(log_cost.to(torch.double), nan=float("inf"))
    alive = list(range(m))
    drop_expensive = True
    while len(alive) > 1:
        if drop_expensive:
            worst = max(alive, key=lambda i: (float(cost[i]), i))
        else:
            worst = max(alive, key=lambda i: (-float(novelty[i]), i))
        alive.remove(worst)
        drop_expensive = not drop_expensive
    return alive[0]
