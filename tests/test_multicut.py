import itertools

import numpy as np
import pytest

from micro_sam import _multicut as mc


def _random_graph(rng, n_nodes, density=0.7):
    pairs = [pair for pair in itertools.combinations(range(n_nodes), 2) if rng.random() < density]
    return np.array(pairs, dtype="int64").reshape(-1, 2), rng.normal(size=len(pairs))


def _is_consecutive(labels):
    return np.array_equal(np.unique(labels), np.arange(labels.max() + 1))


def test_brute_force_enumerates_all_partitions():
    # Bell numbers.
    assert [sum(1 for _ in mc._partitions(n)) for n in range(1, 7)] == [1, 2, 5, 15, 52, 203]


def test_energy_counts_cut_edges_only():
    uv = np.array([[0, 1], [1, 2], [0, 2]])
    costs = np.array([1.0, -2.0, 4.0])
    assert mc.multicut_energy(uv, costs, np.array([0, 0, 0])) == 0.0
    assert mc.multicut_energy(uv, costs, np.array([0, 0, 1])) == 2.0
    assert mc.multicut_energy(uv, costs, np.array([0, 1, 2])) == 3.0


def test_attractive_and_repulsive_edges():
    # Two triangles held together internally, connected by a repulsive edge.
    uv = np.array([[0, 1], [1, 2], [0, 2], [3, 4], [4, 5], [3, 5], [2, 3]])
    costs = np.array([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, -5.0])
    for solve in (mc.greedy_additive_edge_contraction, mc.kernighan_lin, mc.solve_multicut):
        assert solve(6, uv, costs).tolist() == [0, 0, 0, 1, 1, 1]
    # Without attraction every node stays alone; an isolated node is its own cluster.
    assert mc.solve_multicut(4, uv[:1], np.array([-1.0])).tolist() == [0, 1, 2, 3]


def test_multicut_beats_thresholding_and_connected_components():
    # a-b and b-c attract, but a-c repel strongly: a, b, c must not all be one cluster although they are
    # connected by attractive edges (which is what naive thresholding + connected components does).
    uv = np.array([[0, 1], [1, 2], [0, 2]])
    costs = np.array([5.0, 4.0, -20.0])
    labels = mc.solve_multicut(3, uv, costs)
    assert labels.tolist() == [0, 0, 1]
    _, optimum = mc.brute_force_multicut(3, uv, costs)
    assert mc.multicut_energy(uv, costs, labels) == optimum == -16.0
    assert mc.multicut_energy(uv, costs, np.zeros(3, dtype=int)) == 0.0  # connected components result


def test_kernighan_lin_fixes_greedy_mistake():
    # GAEC first contracts the strongest edge b-c (+10) and then cannot join a or d (each -3 net).
    # The optimum {a, b}, {c, d} needs a move with negative gain first (b -> a: -4, then c -> d: +6).
    a, b, c, d = range(4)
    uv = np.array([[b, c], [a, b], [c, d], [a, c], [b, d]])
    costs = np.array([10.0, 6.0, 6.0, -9.0, -9.0])
    greedy = mc.greedy_additive_edge_contraction(4, uv, costs)
    assert greedy.tolist() == [0, 1, 1, 2]
    assert mc.multicut_energy(uv, costs, greedy) == -6.0
    optimal_labels, optimum = mc.brute_force_multicut(4, uv, costs)
    assert optimum == -8.0 and optimal_labels.tolist() == [0, 0, 1, 1]
    assert mc.kernighan_lin(4, uv, costs).tolist() == [0, 0, 1, 1]
    assert mc.solve_multicut(4, uv, costs).tolist() == [0, 0, 1, 1]
    assert mc.solve_multicut(4, uv, costs, solver="greedy-additive").tolist() == [0, 1, 1, 2]


def test_seven_node_case_where_only_kernighan_lin_is_optimal():
    # Found by random search against the brute force solver.
    uv = np.array([(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 2), (1, 4), (1, 5), (1, 6), (2, 3), (2, 4), (2, 5),
                   (3, 4), (3, 5), (4, 5), (4, 6), (5, 6)])
    costs = np.array([-1.01, 0.33, -0.15, 0.14, 0.33, -1.22, -1.07, 1.4, 0.29, 0.11, -0.04, 0.36, -1.16, -1.0,
                      1.3, 0.15, 0.85])
    optimal_labels, optimum = mc.brute_force_multicut(7, uv, costs)
    greedy = mc.greedy_additive_edge_contraction(7, uv, costs)
    assert mc.multicut_energy(uv, costs, greedy) > optimum + 1e-6
    labels = mc.solve_multicut(7, uv, costs)
    assert mc.multicut_energy(uv, costs, labels) == pytest.approx(optimum)
    assert labels.tolist() == optimal_labels.tolist()


def test_random_small_graphs_against_brute_force():
    rng = np.random.default_rng(42)
    n_optimal, n_total = 0, 0
    for _ in range(60):
        n_nodes = int(rng.integers(2, 8))
        uv, costs = _random_graph(rng, n_nodes)
        _, optimum = mc.brute_force_multicut(n_nodes, uv, costs)
        greedy = mc.greedy_additive_edge_contraction(n_nodes, uv, costs)
        refined = mc.kernighan_lin(n_nodes, uv, costs)
        decomposed = mc.solve_multicut(n_nodes, uv, costs)
        energies = [mc.multicut_energy(uv, costs, labels) for labels in (greedy, refined, decomposed)]
        assert energies[0] >= optimum - 1e-9
        assert energies[1] <= energies[0] + 1e-9  # local search never worsens the start
        assert energies[2] == pytest.approx(energies[1])  # decomposition does not change the result quality
        for labels in (greedy, refined, decomposed):
            assert _is_consecutive(labels)
        n_optimal += abs(energies[1] - optimum) < 1e-9
        n_total += 1
    assert n_optimal >= 0.95 * n_total


def test_solutions_have_connected_clusters():
    # Nodes 0 and 2 are not adjacent: they cannot form one cluster although both are alone.
    uv = np.array([[0, 1], [1, 2]])
    costs = np.array([-1.0, -1.0])
    assert mc.kernighan_lin(3, uv, costs, node_labels=np.array([0, 1, 0])).tolist() == [0, 1, 2]


def test_parallel_edges_are_summed_and_self_loops_ignored():
    uv = np.array([[0, 1], [1, 0], [1, 1]])
    assert mc.solve_multicut(2, uv, np.array([1.0, -3.0, 100.0])).tolist() == [0, 1]
    assert mc.solve_multicut(2, uv, np.array([4.0, -3.0, -100.0])).tolist() == [0, 0]


def test_large_layered_graph():
    # 20000 chains of 5 nodes (like objects through 5 slices); neighbouring chains are connected by weakly
    # attractive edges in one layer and a repulsive edge in the next, so each chain must stay one cluster.
    rng = np.random.default_rng(0)
    n_chains, length = 20000, 5
    nodes = np.arange(n_chains * length).reshape(n_chains, length)
    chain_uv = np.stack([nodes[:, :-1].ravel(), nodes[:, 1:].ravel()], axis=1)
    chain_costs = rng.uniform(2.0, 5.0, len(chain_uv))
    cross_a = np.stack([nodes[:-1, 1], nodes[1:, 2]], axis=1)
    cross_b = np.stack([nodes[:-1, 3], nodes[1:, 2]], axis=1)
    uv = np.concatenate([chain_uv, cross_a, cross_b])
    costs = np.concatenate([chain_costs, np.full(len(cross_a), 0.5), np.full(len(cross_b), -8.0)])
    labels = mc.solve_multicut(nodes.size, uv, costs)
    assert np.array_equal(labels, np.repeat(np.arange(n_chains), length))


@pytest.mark.parametrize("args", [
    (3, np.array([[0, 1, 2]]), np.array([1.0])),
    (3, np.array([[0, 1]]), np.array([1.0, 2.0])),
    (3, np.array([[0, 3]]), np.array([1.0])),
    (3, np.array([[0, 1]]), np.array([np.nan])),
    (-1, np.zeros((0, 2)), np.zeros(0)),
])
def test_invalid_problems(args):
    with pytest.raises(ValueError):
        mc.solve_multicut(*args)


def test_invalid_solver_and_labels():
    with pytest.raises(ValueError, match="solver"):
        mc.solve_multicut(2, np.array([[0, 1]]), np.array([1.0]), solver="ilp")
    with pytest.raises(ValueError, match="node_labels"):
        mc.kernighan_lin(2, np.array([[0, 1]]), np.array([1.0]), node_labels=np.zeros(3))


def test_empty_graph():
    assert mc.solve_multicut(0, np.zeros((0, 2)), np.zeros(0)).shape == (0,)
    assert mc.solve_multicut(3, np.zeros((0, 2)), np.zeros(0)).tolist() == [0, 1, 2]
