"""A small multicut (correlation clustering) solver in numpy / scipy.

Problem: given an undirected graph with real edge costs, find a partition of the nodes into clusters that
minimises the summed cost of the edges *between* clusters (the cut edges). A positive cost therefore means the
two nodes would like to be in the same cluster (attractive), a negative cost that they would like to be separated
(repulsive). This is the convention of nifty / elf / bioimage-cpp, so costs computed for those solvers can be used
unchanged.

Solvers:
- :func:`greedy_additive_edge_contraction` (GAEC, Keuper et al. 2015): repeatedly contracts the most attractive
  edge of the current cluster graph, summing parallel edges, until no attractive edge is left.
- :func:`kernighan_lin`: local search started from a partition (GAEC by default). Each round is a
  variable-depth pass of single-node moves (to a neighbouring cluster or to a new cluster; intermediate moves
  may worsen the objective, the best prefix of the move sequence is kept) followed by greedy joins of adjacent
  clusters. Rounds are repeated until the objective stops decreasing.
- :func:`solve_multicut`: first splits the problem into the connected components of the graph restricted to
  attractive edges (an optimal partition never joins two such components, because every edge between them is
  non-attractive), solves components without internal repulsive edges in closed form (one cluster) and runs
  GAEC (+ Kernighan-Lin) only on the others.

Node labels returned by all solvers are consecutive (0 .. n_clusters - 1), numbered in the order of the
smallest node of each cluster, and every cluster is connected in the graph.
"""
from __future__ import annotations

import heapq
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

_SOLVERS = ("kernighan-lin", "greedy-additive")


# --- input handling ----------------------------------------------------------------------------------------
def _canonical_edges(n_nodes: int, uv_ids, costs) -> Tuple[np.ndarray, np.ndarray]:
    """Validate the problem; return edges with u < v, parallel edges summed, self loops dropped."""
    if int(n_nodes) != n_nodes or n_nodes < 0:
        raise ValueError(f"n_nodes must be a non-negative integer, got {n_nodes}.")
    n_nodes = int(n_nodes)
    uv_ids = np.asarray(uv_ids)
    costs = np.asarray(costs, dtype="float64")
    if uv_ids.size == 0:
        uv_ids = uv_ids.reshape(0, 2)
    if uv_ids.ndim != 2 or uv_ids.shape[1] != 2:
        raise ValueError(f"uv_ids must have shape (n_edges, 2), got {uv_ids.shape}.")
    if costs.shape != (uv_ids.shape[0],):
        raise ValueError(f"costs must have shape ({uv_ids.shape[0]},) (one per edge), got {costs.shape}.")
    if uv_ids.shape[0] and (uv_ids.min() < 0 or uv_ids.max() >= n_nodes):
        raise ValueError(f"uv_ids must be node ids in [0, {n_nodes - 1}], got values in "
                         f"[{uv_ids.min()}, {uv_ids.max()}].")
    if not np.all(np.isfinite(costs)):
        raise ValueError("costs must be finite.")
    uv_ids = uv_ids.astype("int64")
    u, v = uv_ids.min(axis=1), uv_ids.max(axis=1)
    keep = u != v
    u, v, costs = u[keep], v[keep], costs[keep]
    keys, inverse = np.unique(u * max(n_nodes, 1) + v, return_inverse=True)
    summed = np.bincount(inverse.ravel(), weights=costs, minlength=len(keys))
    uv = np.stack([keys // max(n_nodes, 1), keys % max(n_nodes, 1)], axis=1)
    return uv, summed


def multicut_energy(uv_ids: np.ndarray, costs: np.ndarray, node_labels: np.ndarray) -> float:
    """The multicut objective of a partition: the summed cost of the edges between different clusters.

    Args:
        uv_ids: The edges, shape (n_edges, 2), node ids.
        costs: The edge costs, shape (n_edges,); positive = attractive.
        node_labels: The cluster label of every node.

    Returns:
        The objective (lower is better).
    """
    uv_ids = np.asarray(uv_ids, dtype="int64").reshape(-1, 2)
    node_labels = np.asarray(node_labels)
    cut = node_labels[uv_ids[:, 0]] != node_labels[uv_ids[:, 1]]
    return float(np.asarray(costs, dtype="float64")[cut].sum())


def _consecutive_connected(n_nodes: int, uv: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Split clusters into their connected parts and number them 0.. by their smallest node."""
    if n_nodes == 0:
        return np.zeros(0, dtype="int64")
    labels = np.asarray(labels)
    same = labels[uv[:, 0]] == labels[uv[:, 1]]
    _, parts = _components(n_nodes, uv[same])
    # Number the parts by their smallest node.
    first = np.full(parts.max() + 1, n_nodes, dtype="int64")
    np.minimum.at(first, parts, np.arange(n_nodes))
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[parts]


def _components(n_nodes: int, uv: np.ndarray) -> Tuple[int, np.ndarray]:
    graph = coo_matrix((np.ones(len(uv), dtype="int8"), (uv[:, 0], uv[:, 1])), shape=(n_nodes, n_nodes))
    return connected_components(graph, directed=False)


def _adjacency(n_nodes: int, uv: np.ndarray, costs: np.ndarray) -> List[dict]:
    adjacency = [dict() for _ in range(n_nodes)]
    for (u, v), c in zip(uv.tolist(), costs.tolist()):
        adjacency[u][v] = c
        adjacency[v][u] = c
    return adjacency


# --- greedy additive edge contraction ---------------------------------------------------------------------
def _gaec(n_nodes: int, uv: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """GAEC on canonical edges; returns a (not yet consecutive) cluster representative per node."""
    adjacency = _adjacency(n_nodes, uv, costs)
    heap = [(-c, u, v) for (u, v), c in zip(uv.tolist(), costs.tolist()) if c > 0]
    heapq.heapify(heap)
    merged_into = np.arange(n_nodes)
    alive = [True] * n_nodes
    while heap:
        neg_cost, u, v = heapq.heappop(heap)
        if not (alive[u] and alive[v]) or adjacency[u].get(v) != -neg_cost:
            continue  # stale entry: an endpoint was contracted or the edge cost changed since it was pushed
        if len(adjacency[u]) < len(adjacency[v]):
            u, v = v, u  # contract the node with fewer neighbours (v) into the other one (u)
        del adjacency[u][v]
        del adjacency[v][u]
        for w, c in adjacency[v].items():
            del adjacency[w][v]
            new_cost = adjacency[u].get(w, 0.0) + c
            adjacency[u][w] = new_cost
            adjacency[w][u] = new_cost
            if new_cost > 0:
                heapq.heappush(heap, (-new_cost, min(u, w), max(u, w)))
        adjacency[v] = {}
        alive[v] = False
        merged_into[v] = u
    # Resolve the contraction chains to their surviving representative.
    while True:
        parent = merged_into[merged_into]
        if np.array_equal(parent, merged_into):
            return merged_into
        merged_into = parent


def greedy_additive_edge_contraction(n_nodes: int, uv_ids: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """Solve a multicut problem approximately by greedy additive edge contraction (GAEC).

    Args:
        n_nodes: The number of nodes; node ids are 0 .. n_nodes - 1.
        uv_ids: The edges, shape (n_edges, 2). Parallel edges are summed, self loops ignored.
        costs: The edge costs, shape (n_edges,); positive = attractive, negative = repulsive.

    Returns:
        The node labels, shape (n_nodes,), consecutive from 0.
    """
    uv, costs = _canonical_edges(n_nodes, uv_ids, costs)
    return _consecutive_connected(int(n_nodes), uv, _gaec(int(n_nodes), uv, costs))


# --- Kernighan-Lin style local search ---------------------------------------------------------------------
def _move_pass(adjacency: List[dict], labels: List[int], epsilon: float, patience: int = 64) -> float:
    """One variable-depth pass of single-node moves; updates labels in place, returns the energy decrease.

    The sequence of moves ends when every node was moved once or after ``patience`` moves without a new best
    cumulative gain; the moves after the best prefix are undone.
    """
    n_nodes = len(labels)
    sizes = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    next_label = max(labels) + 1 if labels else 0

    def best_move(v):
        own_label = labels[v]
        weights = {}
        for w, c in adjacency[v].items():
            weights[labels[w]] = weights.get(labels[w], 0.0) + c
        own = weights.pop(own_label, 0.0)
        # Moving v alone into a new cluster (only meaningful if v is not alone already).
        best_gain, target = (-own, None) if sizes[own_label] > 1 else (-np.inf, own_label)
        for label, weight in weights.items():
            if weight - own > best_gain:
                best_gain, target = weight - own, label
        return best_gain, target

    heap = []
    for v in range(n_nodes):
        if adjacency[v]:
            gain, _ = best_move(v)
            if np.isfinite(gain):
                heap.append((-gain, v))
    heapq.heapify(heap)
    locked = [False] * n_nodes
    moves, total, best_total, best_length = [], 0.0, 0.0, 0
    while heap:
        neg_gain, v = heapq.heappop(heap)
        if locked[v]:
            continue
        gain, target = best_move(v)
        if not np.isfinite(gain):
            continue
        if gain < -neg_gain - 1e-12:  # the gain went down since the entry was pushed: re-queue it
            heapq.heappush(heap, (-gain, v))
            continue
        if target is None:
            target, next_label = next_label, next_label + 1
        source = labels[v]
        labels[v] = target
        sizes[source] -= 1
        sizes[target] = sizes.get(target, 0) + 1
        locked[v] = True
        moves.append((v, source))
        total += gain
        if total > best_total + epsilon:
            best_total, best_length = total, len(moves)
        elif len(moves) - best_length >= patience:
            break
        for w in adjacency[v]:
            if not locked[w]:
                gain_w, _ = best_move(w)
                if np.isfinite(gain_w):
                    heapq.heappush(heap, (-gain_w, w))
    # Undo the moves after the best prefix of the sequence.
    for v, source in reversed(moves[best_length:]):
        labels[v] = source
    return best_total


def kernighan_lin(
    n_nodes: int,
    uv_ids: np.ndarray,
    costs: np.ndarray,
    node_labels: Optional[np.ndarray] = None,
    max_iterations: int = 100,
    epsilon: float = 1e-9,
) -> np.ndarray:
    """Improve a multicut partition by Kernighan-Lin style local search.

    Args:
        n_nodes: The number of nodes; node ids are 0 .. n_nodes - 1.
        uv_ids: The edges, shape (n_edges, 2). Parallel edges are summed, self loops ignored.
        costs: The edge costs, shape (n_edges,); positive = attractive, negative = repulsive.
        node_labels: The initial partition, shape (n_nodes,). By default the GAEC solution.
        max_iterations: The maximal number of rounds (move pass + join pass).
        epsilon: Improvements of the objective below this value count as no improvement.

    Returns:
        The node labels, shape (n_nodes,), consecutive from 0. The objective is never worse than the one of
        the initial partition.
    """
    uv, costs = _canonical_edges(n_nodes, uv_ids, costs)
    n_nodes = int(n_nodes)
    if node_labels is None:
        labels = _gaec(n_nodes, uv, costs)
    else:
        labels = np.asarray(node_labels)
        if labels.shape != (n_nodes,):
            raise ValueError(f"node_labels must have shape ({n_nodes},), got {labels.shape}.")
    labels = _consecutive_connected(n_nodes, uv, labels)
    if len(uv) == 0:
        return labels

    adjacency = _adjacency(n_nodes, uv, costs)
    energy = multicut_energy(uv, costs, labels)
    for _ in range(max_iterations):
        candidate = labels.tolist()
        _move_pass(adjacency, candidate, epsilon)
        candidate = _consecutive_connected(n_nodes, uv, np.array(candidate))
        # Join pass: greedy contraction of the cluster graph of the current partition.
        cluster_uv = candidate[uv]
        cluster_uv, cluster_costs = _canonical_edges(int(candidate.max()) + 1, cluster_uv, costs)
        joined = _gaec(int(candidate.max()) + 1, cluster_uv, cluster_costs)
        candidate = _consecutive_connected(n_nodes, uv, joined[candidate])
        new_energy = multicut_energy(uv, costs, candidate)
        if new_energy < energy - epsilon:
            labels, energy = candidate, new_energy
        else:
            break
    return labels


# --- decomposition + solver dispatch -----------------------------------------------------------------------
def solve_multicut(
    n_nodes: int,
    uv_ids: np.ndarray,
    costs: np.ndarray,
    solver: str = "kernighan-lin",
    decompose: bool = True,
) -> np.ndarray:
    """Solve a multicut problem.

    Args:
        n_nodes: The number of nodes; node ids are 0 .. n_nodes - 1.
        uv_ids: The edges, shape (n_edges, 2). Parallel edges are summed, self loops ignored.
        costs: The edge costs, shape (n_edges,); positive = attractive, negative = repulsive.
        solver: 'kernighan-lin' (GAEC followed by Kernighan-Lin, the default) or 'greedy-additive' (GAEC only).
        decompose: Whether to solve the connected components of the attractive-edge graph independently.
            This does not change the quality of the solution, only the speed.

    Returns:
        The node labels, shape (n_nodes,), consecutive from 0.
    """
    if solver not in _SOLVERS:
        raise ValueError(f"Invalid solver {solver!r}; choose one of {_SOLVERS}.")
    uv, costs = _canonical_edges(n_nodes, uv_ids, costs)
    n_nodes = int(n_nodes)

    def solve(n, sub_uv, sub_costs):
        if solver == "greedy-additive":
            return greedy_additive_edge_contraction(n, sub_uv, sub_costs)
        return kernighan_lin(n, sub_uv, sub_costs)

    if not decompose:
        return solve(n_nodes, uv, costs)
    if n_nodes == 0:
        return np.zeros(0, dtype="int64")

    n_comps, comps = _components(n_nodes, uv[costs > 0])
    labels = comps.copy()  # closed form: every component is one cluster
    inside = comps[uv[:, 0]] == comps[uv[:, 1]]
    uv_in, costs_in, comp_of_edge = uv[inside], costs[inside], comps[uv[inside, 0]]
    # Components with an internal repulsive edge need a real solver.
    hard = np.unique(comp_of_edge[costs_in < 0])
    if len(hard):
        next_label = n_comps
        node_order = np.argsort(comps, kind="stable")
        node_starts = np.searchsorted(comps[node_order], np.arange(n_comps + 1))
        local_index = np.empty(n_nodes, dtype="int64")
        local_index[node_order] = np.arange(n_nodes) - node_starts[comps[node_order]]
        edge_order = np.argsort(comp_of_edge, kind="stable")
        edge_starts = np.searchsorted(comp_of_edge[edge_order], np.arange(n_comps + 1))
        for comp in hard.tolist():
            nodes = node_order[node_starts[comp]:node_starts[comp + 1]]
            edges = edge_order[edge_starts[comp]:edge_starts[comp + 1]]
            sub_labels = solve(len(nodes), local_index[uv_in[edges]], costs_in[edges])
            labels[nodes] = np.where(sub_labels == 0, comp, sub_labels - 1 + next_label)
            next_label += int(sub_labels.max())
    return _consecutive_connected(n_nodes, uv, labels)


def brute_force_multicut(n_nodes: int, uv_ids: np.ndarray, costs: np.ndarray) -> Tuple[np.ndarray, float]:
    """Exact multicut by enumerating all partitions; only for tiny graphs (n_nodes <= 10), e.g. in tests.

    Returns:
        The optimal node labels (consecutive from 0) and the optimal objective.
    """
    if n_nodes > 10:
        raise ValueError(f"brute_force_multicut enumerates all partitions; n_nodes must be <= 10, got {n_nodes}.")
    uv, costs = _canonical_edges(n_nodes, uv_ids, costs)
    best_labels, best_energy = None, np.inf
    for partition in _partitions(int(n_nodes)):
        labels = np.array(partition)
        energy = multicut_energy(uv, costs, labels)
        if energy < best_energy - 1e-12:
            best_labels, best_energy = labels, energy
    return _consecutive_connected(int(n_nodes), uv, best_labels), float(best_energy)


def _partitions(n: int, prefix: Sequence[int] = ()):
    """All set partitions of n elements as restricted growth strings."""
    if len(prefix) == n:
        yield list(prefix)
        return
    n_used = max(prefix) + 1 if prefix else 0
    for label in range(n_used + 1):
        yield from _partitions(n, tuple(prefix) + (label,))
