"""Equal-size token clusters for the clustered draft head, from the target's output embeddings.

Spherical k-means on the normalised rows of the output head, then a balanced assignment (every
cluster holds exactly V / C tokens, as Gemma 4's `token_ordering` does) so that the tokens of a
cluster are one contiguous slice of the ordering.
"""

from __future__ import annotations

import torch


def balanced_clusters(
    emb: torch.Tensor, num_clusters: int, iters: int = 8, seed: int = 0, chunk: int = 32768
) -> tuple[torch.Tensor, torch.Tensor]:
    """emb [V, H] -> (token_ordering [V] long, centroids [C, H] unit-norm). V % C must be 0."""
    V, H = emb.shape
    if V % num_clusters:
        raise ValueError(f"vocabulary {V} is not a multiple of {num_clusters} clusters")
    cap = V // num_clusters
    x = torch.nn.functional.normalize(emb.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    cent = x[torch.randperm(V, generator=g)[:num_clusters]].clone()
    for _ in range(iters):
        assign = torch.cat([(x[i : i + chunk] @ cent.T).argmax(-1) for i in range(0, V, chunk)])
        sums = torch.zeros_like(cent).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_clusters)
        empty = counts == 0
        cent = torch.nn.functional.normalize(sums, dim=-1)
        if empty.any():  # reseed empty clusters with random tokens
            cent[empty] = x[torch.randint(0, V, (int(empty.sum()),), generator=g)]

    # Balanced assignment: best-scoring (token, cluster) pairs first, each cluster up to `cap`.
    top_k = min(8, num_clusters)
    scores, choices = [], []
    for i in range(0, V, chunk):
        s, c = (x[i : i + chunk] @ cent.T).topk(top_k, dim=-1)
        scores.append(s)
        choices.append(c)
    scores, choices = torch.cat(scores), torch.cat(choices)
    order = scores.flatten().argsort(descending=True)
    tok_of = order // top_k
    clu_of = choices.flatten()[order]
    owner = torch.full((V,), -1, dtype=torch.long)
    fill = torch.zeros(num_clusters, dtype=torch.long)
    for t, c in zip(tok_of.tolist(), clu_of.tolist(), strict=True):
        if owner[t] < 0 and fill[c] < cap:
            owner[t] = c
            fill[c] += 1
    left = (owner < 0).nonzero().flatten().tolist()
    free = [c for c in range(num_clusters) for _ in range(cap - int(fill[c]))]
    for t, c in zip(left, free, strict=True):
        owner[t] = c
    ordering = torch.argsort(owner * V + torch.arange(V), stable=True)
    return ordering, cent


def use_clusters(drafter, tables, ordering: torch.Tensor, centroids: torch.Tensor) -> None:
    """Give a clustered drafter head its token ordering and initial centroids (unit vectors scaled to
    the head rows' mean norm, so centroid scores start on the scale of token scores), and tell the
    trainer's `tables` each token's cluster."""
    drafter.token_ordering = ordering
    with torch.no_grad():
        drafter.centroids.weight.copy_(centroids * tables.head.norm(dim=-1).mean())
    tables.set_clusters(ordering.to(tables.head.device), drafter.config.num_centroids)
