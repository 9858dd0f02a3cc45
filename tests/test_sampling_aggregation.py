"""Sampling and aggregation are pure functions: checked without a network."""

from __future__ import annotations

import torch

from asyndgan.central_server.aggregation import SiteGradient, combine, site_weights
from asyndgan.central_server.sampling import plan_batches


def test_balance_gives_every_site_a_full_batch_within_its_range():
    plan = plan_batches({"a": 100, "b": 3}, 8, "balance", torch.Generator().manual_seed(0))
    assert {s: len(k) for s, k in plan.items()} == {"a": 8, "b": 8}
    assert int(plan["b"].max()) < 3


def test_uniform_sampling_follows_site_sizes():
    counts = {"a": 0, "b": 0}
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        plan = plan_batches({"a": 900, "b": 100}, 10, "uniform", rng)
        assert sum(len(k) for k in plan.values()) == 10
        for s, k in plan.items():
            counts[s] += len(k)
            assert int(k.max()) < {"a": 900, "b": 100}[s]
    share_b = counts["b"] / 2000
    assert 0.07 < share_b < 0.13


def _result(rows, g, n, b, channels=None):
    return SiteGradient(rows=rows, channels=channels, gradient=g, num_samples=n, batch_size=b)


def test_weights_balance_and_uniform():
    r = {"a": _result(slice(0, 2), torch.ones(2, 1), 30, 2), "b": _result(slice(2, 3), torch.ones(1, 1), 10, 1)}
    assert site_weights(r, "balance") == {"a": 0.75, "b": 0.25}
    w = site_weights(r, "uniform")
    assert abs(w["a"] - 2 / 3) < 1e-12 and abs(w["b"] - 1 / 3) < 1e-12


def test_combine_places_weighted_gradients_in_rows_and_channels():
    like = torch.zeros(3, 4, 2, 2)
    r = {
        "a": _result(slice(0, 2), torch.full((2, 4, 2, 2), 2.0), 1, 2),
        "b": _result(slice(2, 3), torch.full((1, 2, 2, 2), 4.0), 1, 1, channels=[1, 3]),
    }
    out = combine(r, {"a": 0.5, "b": 0.25}, like)
    assert torch.all(out[:2] == 1.0)
    assert torch.all(out[2, [1, 3]] == 1.0) and torch.all(out[2, [0, 2]] == 0.0)


def test_a_missing_site_leaves_its_rows_zero_and_weights_renormalise():
    like = torch.zeros(4, 1)
    r = {"a": _result(slice(0, 2), torch.ones(2, 1), 10, 2)}
    w = site_weights(r, "balance")
    assert w == {"a": 1.0}
    out = combine(r, w, like)
    assert out[:2].sum() == 2 and out[2:].abs().sum() == 0


def test_channel_weights_renormalise_each_modality_over_the_sites_that_hold_it():
    from asyndgan.central_server.aggregation import channel_weights

    # a holds channels 0..3 (n 30), b holds 1 and 3 (n 10): channel 0 and 2 come from a alone, at full weight.
    r = {
        "a": _result(slice(0, 2), torch.ones(2, 4, 2, 2), 30, 2),
        "b": _result(slice(2, 3), torch.ones(1, 2, 2, 2), 10, 1, channels=[1, 3]),
    }
    w = channel_weights(r, site_weights(r, "balance"), 4)
    assert torch.allclose(w["a"], torch.tensor([1.0, 0.75, 1.0, 0.75]))
    assert torch.allclose(w["b"], torch.tensor([0.25, 0.25]))
    out = combine(r, w, torch.zeros(3, 4, 2, 2))
    assert torch.all(out[0, 0] == 1.0) and torch.all(out[0, 1] == 0.75)
    assert torch.all(out[2, [0, 2]] == 0.0) and torch.all(out[2, [1, 3]] == 0.25)
    # every site holding every channel: the plain weights
    full = {"a": r["a"], "c": _result(slice(2, 3), torch.ones(1, 4, 2, 2), 10, 1)}
    plain = site_weights(full, "balance")
    cw = channel_weights(full, plain, 4)
    assert torch.allclose(cw["a"], torch.full((4,), 0.75)) and torch.allclose(cw["c"], torch.full((4,), 0.25))
