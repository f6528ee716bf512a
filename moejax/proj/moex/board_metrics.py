"""Board-state probing metrics of Karvonen et al. (2024), as used by MoE-X (Yang et al. 2025).

Inputs are feature activations at the labelled character positions (rows) and the 768 binary
board-state properties there (moejax/proj/moex/chess_board.py). Definitions:
- Features: the columns of the activation matrix (neurons of z_hat or of a dense MLP's hidden
  code); dead features (max activation <= 0 on the set that fixes thresholds) are dropped.
- Thresholds: t in {0, 0.1, ..., 1.0} x each feature's max activation; "active" = act > t * max.
- BSP coverage: max over t of the mean over properties of the best F1, over features, of
  "feature active" as a predictor of "property holds". Properties that never hold in the set are
  left out of the mean (no feature can score on them).
- Board reconstruction: at each t, on training positions a feature is labelled with every property
  it predicts with precision >= 0.95, counting only features active >= 10 times; on held-out
  positions the predicted board is the union of the labels of the active features; the score is
  the mean over positions of the F1 between predicted and true property sets (1 when both are
  empty); the result is the best t. The thresholds' maxima come from the training positions.

Vectorised with numpy: per threshold, features are processed in chunks so that memory stays
O(rows x chunk), and the counts are float32 matmuls (exact below 2^24 rows).
Letters: n rows (positions), m features, p properties.
"""

from __future__ import annotations

import numpy as np

THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(11))
MIN_PRECISION = 0.95
MIN_ACTIVATIONS = 10
_CHUNK = 2048


def alive_features(acts_nm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(activations of the features whose max > 0, those maxima)."""
  maxes = acts_nm.max(axis=0) if len(acts_nm) else np.zeros(acts_nm.shape[1])
  keep = maxes > 0
  return acts_nm[:, keep], maxes[keep]


def _chunks(num_features: int):
  for start in range(0, num_features, _CHUNK):
    yield slice(start, min(start + _CHUNK, num_features))


def best_f1_per_property(acts_nm, maxes_m, labels_np, threshold: float) -> np.ndarray:
  """float64[P]: max over features of F1(act > threshold * max  predicts  property)."""
  labels = labels_np.astype(np.float32)
  n_pos_p = labels.sum(axis=0)
  best = np.zeros(labels.shape[1])
  for c in _chunks(acts_nm.shape[1]):
    active = (acts_nm[:, c] > threshold * maxes_m[c]).astype(np.float32)
    tp_mp = active.T @ labels
    denom = active.sum(axis=0)[:, None] + n_pos_p[None, :]
    f1 = np.divide(2 * tp_mp, denom, out=np.zeros_like(tp_mp), where=denom > 0)
    best = np.maximum(best, f1.max(axis=0, initial=0.0))
  return best


def coverage(acts_nm, labels_np, thresholds=THRESHOLDS) -> dict:
  """BSP coverage of features `acts_nm` [N, M] for properties `labels_np` bool[N, P]."""
  acts, maxes = alive_features(np.asarray(acts_nm, np.float32))
  labels = np.asarray(labels_np, bool)
  present = labels.any(axis=0)
  per_t = [float(best_f1_per_property(acts, maxes, labels, t)[present].mean()) for t in thresholds]
  best = int(np.argmax(per_t))
  return {"coverage": per_t[best], "threshold": thresholds[best], "per_threshold": per_t}


def feature_labels(
  active_nm, labels_np, min_precision=MIN_PRECISION, min_activations=MIN_ACTIVATIONS
) -> np.ndarray:
  """bool[M, P]: properties each feature predicts with precision >= min_precision (>= min acts)."""
  active = active_nm.astype(np.float32)
  n_active_m = active.sum(axis=0)
  tp_mp = active.T @ labels_np.astype(np.float32)
  precision = tp_mp / np.maximum(n_active_m, 1.0)[:, None]
  return (precision >= min_precision) & (n_active_m >= min_activations)[:, None]


def board_f1(pred_np, true_np) -> np.ndarray:
  """float64[N]: per row F1 of two property sets (1 where both are empty)."""
  inter = np.sum(pred_np & true_np, axis=1)
  denom = pred_np.sum(axis=1) + true_np.sum(axis=1)
  return np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)


def reconstruction(acts_train, labels_train, acts_val, labels_val, thresholds=THRESHOLDS) -> dict:
  """Board reconstruction F1 on held-out rows from features labelled on training rows."""
  acts_train = np.asarray(acts_train, np.float32)
  acts_val = np.asarray(acts_val, np.float32)
  labels_train, labels_val = np.asarray(labels_train, bool), np.asarray(labels_val, bool)
  maxes = acts_train.max(axis=0) if len(acts_train) else np.zeros(acts_train.shape[1])
  keep = maxes > 0
  acts_train, acts_val, maxes = acts_train[:, keep], acts_val[:, keep], maxes[keep]
  per_t, labelled = [], []
  for t in thresholds:
    votes = np.zeros(labels_val.shape, np.float32)
    num_labelled = 0
    for c in _chunks(acts_train.shape[1]):
      lab_mp = feature_labels(acts_train[:, c] > t * maxes[c], labels_train)
      num_labelled += int(lab_mp.any(axis=1).sum())
      votes += (acts_val[:, c] > t * maxes[c]).astype(np.float32) @ lab_mp.astype(np.float32)
    per_t.append(float(board_f1(votes > 0, labels_val).mean()))
    labelled.append(num_labelled)
  best = int(np.argmax(per_t))
  return {
    "reconstruction": per_t[best],
    "threshold": thresholds[best],
    "per_threshold": per_t,
    "labelled_features": labelled[best],
  }
