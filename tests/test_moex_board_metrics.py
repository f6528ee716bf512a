"""Board-probing metrics (moejax/proj/moex/board_metrics.py) on synthetic data, hand-computed."""

import numpy as np
import pytest

from moejax.proj.moex import board_metrics as bm

# Six positions, two features, two properties (worked through by hand in the tests below).
ACTS = np.array([[1.0, 0.0], [0.5, 2.0], [0.0, 2.0], [0.2, 0.0], [0.0, 1.0], [0.9, 0.0]])
LABELS = np.array([[1, 0], [1, 1], [0, 1], [0, 0], [0, 0], [1, 0]], bool)


def test_coverage_hand_computed():
  # t=0, 0.1: f0 on {0,1,3,5}: prop0 F1 = 2*3/(4+3) = 6/7; f1 on {1,2,4}: prop1 F1 = 4/5.
  # t=0.2..0.4: f0 on {0,1,5}: prop0 F1 = 1; prop1 stays 0.8 -> 0.9.
  # t=0.5..0.8: f0 on {0,5}: prop0 0.8; f1 on {1,2}: prop1 1.0 -> 0.9.
  # t=0.9: f0 on {0}: prop0 2/(1+3) = 0.5 (f1 gives 0.4) ; prop1 1.0 -> 0.75. t=1: nothing on.
  want = [(6 / 7 + 0.8) / 2] * 2 + [0.9] * 7 + [0.75, 0.0]
  got = bm.coverage(ACTS, LABELS)
  np.testing.assert_allclose(got["per_threshold"], want, atol=1e-6)
  assert got["coverage"] == pytest.approx(0.9) and got["threshold"] == 0.2


def test_reconstruction_hand_computed():
  train_acts, train_labels = np.tile(ACTS, (10, 1)), np.tile(LABELS, (10, 1))  # >= 10 activations
  val_acts = np.array([[1.0, 2.0], [0.0, 1.5], [0.3, 0.0]])
  val_labels = np.array([[1, 1], [0, 1], [1, 0]], bool)
  # Labels: t<=0.1 none (precision 3/4); 0.2..0.4 f0->prop0; 0.5..0.9 f0->prop0 and f1->prop1.
  # Held-out F1 per row, averaged: t=0.2 (2/3 + 0 + 1)/3; t=0.3, 0.4 (2/3 + 0 + 0)/3;
  # t=0.5..0.7 (1 + 1 + 0)/3; t=0.8, 0.9 (1 + 0 + 0)/3; t=1 nothing active.
  want = [0, 0, 5 / 9, 2 / 9, 2 / 9, 2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0]
  got = bm.reconstruction(train_acts, train_labels, val_acts, val_labels)
  np.testing.assert_allclose(got["per_threshold"], want, atol=1e-6)
  assert got["reconstruction"] == pytest.approx(2 / 3) and got["threshold"] == 0.5
  # Fewer than 10 activations: no feature is labelled, nothing is reconstructed.
  few = bm.reconstruction(ACTS, LABELS, val_acts, val_labels)
  assert few["reconstruction"] == 0 and few["labelled_features"] == 0


def test_identical_feature_scores_one_and_random_features_score_chance():
  rng = np.random.default_rng(0)
  prevalence = rng.uniform(0.05, 0.5, size=16)
  labels = rng.random((3000, 16)) < prevalence
  noise = np.maximum(rng.normal(size=(3000, 40)), 0)
  # A feature equal to property 5 (plus unrelated noise features): F1 = 1 for that property.
  acts = np.concatenate([noise, labels[:, 5:6] * 0.7], axis=1)
  assert bm.best_f1_per_property(acts, acts.max(0), labels, 0.0)[5] == pytest.approx(1.0)
  assert bm.coverage(labels.astype(float), labels)["coverage"] == pytest.approx(1.0)
  half = len(labels) // 2
  perfect = bm.reconstruction(labels[:half], labels[:half], labels[half:], labels[half:])
  assert perfect["reconstruction"] == pytest.approx(1.0)
  # Random features: no better than the "always on" predictor's F1 2p/(1+p), up to the max over
  # 40 features; and precision 0.95 is reached only by luck on ~10 activations (p <= 0.5), so
  # reconstruction stays near zero.
  chance = np.mean(2 * labels.mean(0) / (1 + labels.mean(0)))
  random_cov = bm.coverage(noise, labels)["coverage"]
  assert random_cov < chance + 0.03, (random_cov, chance)
  rec = bm.reconstruction(noise[:half], labels[:half], noise[half:], labels[half:])
  assert rec["reconstruction"] < 0.02, rec


def test_dead_features_are_dropped_and_chunks_agree(monkeypatch):
  rng = np.random.default_rng(1)
  labels = rng.random((400, 6)) < 0.3
  acts = np.maximum(rng.normal(size=(400, 50)), 0)
  acts[:, ::7] = 0.0  # dead features
  whole = bm.coverage(acts, labels)
  monkeypatch.setattr(bm, "_CHUNK", 8)
  np.testing.assert_allclose(bm.coverage(acts, labels)["per_threshold"], whole["per_threshold"])
  assert bm.alive_features(acts)[0].shape[1] == 50 - len(range(0, 50, 7))
