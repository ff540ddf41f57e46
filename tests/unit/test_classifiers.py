"""Classifiers on frozen features, on sklearn's digits raw pixels (pure CPU, fast).

References are independent: sklearn's LogisticRegression for the probe's solver and the
few-shot episodes, and a brute-force numpy loop for the kNN vote.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedShuffleSplit, train_test_split

from stablerep.errors import InputError
from stablerep.evaluation.classifiers import (
    DEFAULT_C_VALUES,
    episode_accuracies,
    episode_logits,
    few_shot,
    fit_logistic,
    knn_accuracy,
    knn_predict,
    linear_probe,
    sample_episodes,
    stratified_split,
)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified 2/3 : 1/3 split of digits raw pixels: (train_x, train_y, test_x, test_y)."""
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=1 / 3, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


# ----------------------------------------------------------------------------- linear probe


def test_probe_digits_reaches_logistic_regression_accuracy(digits):
    c_values = [1e-2, 1e-1, 1.0]
    r = linear_probe(*digits, c_values=c_values, refine=False, progress=False)
    assert r.top1 > 0.9
    assert r.top5 is not None and r.top5 >= r.top1
    assert [c for c, _ in r.sweep] == c_values
    assert r.best_c in c_values
    assert r.val_top1 == max(a for _, a in r.sweep)
    assert r.seconds > 0


def test_probe_default_grid_coarse_to_fine_search(digits):
    xtr, ytr, xte, yte = digits
    r = linear_probe(xtr[:400], ytr[:400], xte, yte, max_iter=30, refine=True, progress=False)
    tried = [c for c, _ in r.sweep]
    assert len(DEFAULT_C_VALUES) == 45
    assert DEFAULT_C_VALUES[0] == pytest.approx(1e-6) and DEFAULT_C_VALUES[-1] == pytest.approx(1e5)
    coarse = [*DEFAULT_C_VALUES[::8], DEFAULT_C_VALUES[-1]]
    coarse_tried = [c for c in coarse if c in tried]  # weak end may be cut short
    assert len(coarse_tried) >= 3 and coarse_tried == coarse[:len(coarse_tried)]
    assert len(tried) <= 13 and tried == sorted(tried)
    best = DEFAULT_C_VALUES.index(r.best_c)
    neighbours = [DEFAULT_C_VALUES[i] for i in (best - 1, best + 1) if 0 <= i < 45]
    assert set(neighbours) <= set(tried)  # refined down to single grid steps around the best


def test_probe_two_classes_has_no_top5(digits):
    xtr, ytr, xte, yte = digits
    tr, te = ytr < 2, yte < 2
    r = linear_probe(xtr[tr], ytr[tr], xte[te], yte[te], c_values=[1.0], progress=False)
    assert r.top5 is None and r.top1 > 0.95


def test_solver_agrees_with_sklearn(digits):
    xtr, ytr, xte, yte = digits
    xtr, ytr = xtr[:600], ytr[:600]
    mean, std = xtr.mean(0), xtr.std(0, ddof=1)
    std[std == 0] = 1.0
    a, b = (xtr - mean) / std, (xte - mean) / std
    for c in (0.01, 1.0):
        sk = LogisticRegression(C=c, tol=1e-7, max_iter=2000).fit(a, ytr)
        (w, bias), _ = fit_logistic(torch.from_numpy(a).float(), torch.from_numpy(ytr), c, 10,
                                    max_iter=1000, tol=1e-6)
        w, bias = w.numpy(), bias.numpy()
        np.testing.assert_allclose(w, sk.coef_, atol=2e-3 * np.abs(sk.coef_).max())
        np.testing.assert_allclose(bias - bias.mean(), sk.intercept_ - sk.intercept_.mean(),
                                   atol=1e-2)
        ours = (b @ w.T + bias).argmax(1)
        assert (ours == yte).mean() == (sk.predict(b) == yte).mean()


def test_stratified_split_is_sklearns_and_keeps_singletons_in_fit():
    y = np.repeat(np.arange(4), [40, 25, 12, 1])
    fit, held = stratified_split(y, 0.2, seed=3)
    pool = np.flatnonzero(y != 3)
    sk_fit, sk_held = next(StratifiedShuffleSplit(1, test_size=0.2, random_state=3)
                           .split(pool, y[pool]))
    assert held.tolist() == sorted(pool[sk_held].tolist())
    assert fit.tolist() == sorted([*pool[sk_fit].tolist(), 77])
    assert stratified_split(y, 0.2, seed=3)[1].tolist() == held.tolist()  # seeded
    assert stratified_split(y, 0.2, seed=4)[1].tolist() != held.tolist()


def test_stratified_split_too_small_to_hold_out_one_per_class():
    y = np.repeat(np.arange(10), 2)  # 20 samples: 4 held out cannot cover 10 classes
    fit, held = stratified_split(y, 0.2, seed=0)
    assert fit.tolist() == list(range(20)) and held.tolist() == []


def test_stratified_split_holds_out_each_class():
    y = np.repeat(np.arange(3), [10, 5, 1])
    fit, held = stratified_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([fit, held])) == list(range(len(y)))
    assert np.bincount(y[held], minlength=3).tolist() == [2, 1, 0]


@pytest.mark.parametrize("change, message", [
    (dict(train_y=np.zeros(20, dtype=int)), "1 class"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(c_values=[0.0, 1.0]), "c_values"),
    (dict(test_x=np.zeros((5, 3))), "dims"),
    (dict(train_x=np.full((20, 4), np.nan)), "NaN"),
    (dict(train_y=np.zeros(7, dtype=int)), "expected 20 labels"),
])
def test_probe_bad_input(change, message):
    args = dict(train_x=np.random.default_rng(0).normal(size=(20, 4)),
                train_y=np.arange(20) % 2, test_x=np.zeros((5, 4)), test_y=np.zeros(5, int),
                progress=False)
    with pytest.raises(InputError, match=message):
        linear_probe(**{**args, **change})


# --------------------------------------------------------------------------------- few-shot


def test_episodes_reproducible_disjoint_and_shaped(digits):
    y = digits[3]
    eps = sample_episodes(y, way=5, shot=5, query=15, episodes=20, seed=3)
    again = sample_episodes(y, way=5, shot=5, query=15, episodes=20, seed=3)
    other = sample_episodes(y, way=5, shot=5, query=15, episodes=20, seed=4)
    assert all(np.array_equal(a.support, b.support) and np.array_equal(a.query, b.query)
               for a, b in zip(eps, again, strict=True))
    assert any(not np.array_equal(a.support, b.support) for a, b in zip(eps, other, strict=True))
    for ep in eps:
        assert ep.support.shape == (25,) and ep.query.shape == (75,)
        assert len(set(ep.classes.tolist())) == 5
        assert not set(ep.support) & set(ep.query)
        assert len(set(ep.support) | set(ep.query)) == 100
        assert np.array_equal(y[ep.support], ep.classes[ep.support_targets])
        assert np.array_equal(y[ep.query], ep.classes[ep.query_targets])
        assert np.bincount(ep.query_targets).tolist() == [15] * 5


def test_few_shot_digits_well_above_chance(digits):
    r = few_shot(digits[2], digits[3], episodes=100, seed=0, progress=False)
    assert r.mean > 0.6
    assert 0 < r.ci95 < 0.05
    assert (r.episodes, r.way, r.shot, r.query) == (100, 5, 5, 15)


def test_episode_solver_agrees_with_sklearn(digits):
    """Each episode's model equals sklearn's to solver tolerance, and so do its predictions.

    Two solvers of one convex problem agree on the decision function up to their tolerances,
    not bit for bit: a query whose top two classes are closer than that can go either way
    (seen: a margin of 5e-6 in episode 9 with scikit-learn 1.9.1). So predictions must match
    except where sklearn's own margin between the two predicted classes is below the logit
    tolerance, and at least 98% of all queries must match.
    """
    x, y = digits[2], digits[3]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    eps = sample_episodes(y, way=5, shot=1, query=10, episodes=10, seed=1)
    ours = episode_logits(x, eps, c=1.0, batch=4)  # (10, 50, 5)
    agree = total = 0
    for e, logits in zip(eps, ours, strict=True):
        ref = LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(
            x[e.support], e.support_targets).decision_function(x[e.query])  # (50, 5)
        # softmax logits are defined up to a per-row constant: compare row-centred values
        a = logits - logits.mean(1, keepdims=True)
        b = ref - ref.mean(1, keepdims=True)
        atol = 5e-3 * np.abs(b).max()
        np.testing.assert_allclose(a, b, atol=atol)
        mine, theirs = logits.argmax(1), ref.argmax(1)
        rows = np.flatnonzero(mine != theirs)
        margins = ref[rows, theirs[rows]] - ref[rows, mine[rows]]
        assert (margins <= 2 * atol).all(), f"confident disagreement, margins {margins}"
        agree += int((mine == theirs).sum())
        total += len(mine)
    assert agree / total >= 0.98
    accs = episode_accuracies(x, eps, c=1.0, batch=4)
    targets = np.stack([e.query_targets for e in eps])
    np.testing.assert_array_equal(accs, (ours.argmax(2) == targets).mean(1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(way=1), "way must be an integer >= 2"),
    (dict(shot=0), "shot must be an integer >= 1"),
    (dict(query=0), "query must be an integer >= 1"),
    (dict(episodes=0), "episodes must be"),
    (dict(shot=100, query=100), r"needs 5 classes with >= 200 samples; 0 of 10 .*largest"),
    (dict(way=11), "needs 11 classes"),
])
def test_few_shot_bad_input(digits, kwargs, message):
    with pytest.raises(InputError, match=message):
        few_shot(digits[2], digits[3], **{"episodes": 2, "progress": False, **kwargs})


# -------------------------------------------------------------------------------------- kNN


def test_knn_digits(digits):
    assert knn_accuracy(*digits) > 0.9


def brute_force_knn(train_x, train_y, test_x, test_y, k, t) -> float:
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    correct = 0
    for q, label in zip(test_x, test_y, strict=True):
        sims = a @ (q / np.linalg.norm(q))
        votes: dict[int, float] = {}
        for j in np.argsort(-sims)[:k]:
            votes[int(train_y[j])] = votes.get(int(train_y[j]), 0.0) + np.exp(sims[j] / t)
        correct += max(votes, key=votes.get) == label
    return correct / len(test_x)


@pytest.mark.parametrize("k, t", [(1, 0.07), (5, 0.07), (7, 1.0), (100, 0.5)])
def test_knn_equals_brute_force(k, t):
    rng = np.random.default_rng(k)
    train_x, test_x = rng.normal(size=(60, 8)), rng.normal(size=(25, 8))
    train_y, test_y = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    ours = knn_accuracy(train_x, train_y, test_x, test_y, k=k, temperature=t, max_elements=100)
    assert ours == brute_force_knn(train_x, train_y, test_x, test_y, k, t)


def test_knn_predict_on_tensors_matches_knn_accuracy(digits):
    xtr, ytr, xte, yte = digits
    pred = knn_predict(torch.from_numpy(xtr).float(), torch.from_numpy(ytr),
                       torch.from_numpy(xte).float(), classes=10, k=20, max_elements=5000)
    assert pred.dtype == torch.int64 and pred.shape == (len(yte),)
    assert (pred.numpy() == yte).mean() == knn_accuracy(xtr, ytr, xte, yte, k=20)


def test_knn_bad_input():
    with pytest.raises(InputError, match="k >= 1"):
        knn_accuracy(np.ones((3, 2)), np.arange(3), np.ones((2, 2)), np.arange(2), k=0)
