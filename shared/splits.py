"""Evaluation splits. Both express a target as an event index: its history is every earlier
event of the same user (the dataset is in canonical order), so one code path serves both.

- leave-last-out: per user, test = last event, validation = second to last, train = the rest.
  Users with fewer than 3 events are not evaluated (their events still train).
- global temporal: train = events before a time cut; test target = each user's first event
  after the cut (history = everything before it). Validation uses an earlier cut. Unlike
  leave-last-out, no training event is later than any test event, so the future cannot leak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .schema import Dataset


@dataclass
class Split:
    name: str
    train: np.ndarray  # bool per event: may be used for training
    valid: np.ndarray  # int event indices of validation targets
    test: np.ndarray  # int event indices of test targets
    info: dict

    def history_end(self, ds: Dataset, target: int) -> tuple[int, int]:
        """(start, end) event slice of the target's history: same user, strictly earlier."""
        u = ds.user[target]
        start = int(np.searchsorted(ds.user, u, side="left"))
        return start, int(target)


def _user_bounds(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    if not len(ds):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    b = np.flatnonzero(np.diff(ds.user)) + 1
    return np.concatenate([[0], b]), np.concatenate([b, [len(ds)]])


def leave_last_out(ds: Dataset, min_events: int = 3) -> Split:
    starts, ends = _user_bounds(ds)
    ok = (ends - starts) >= min_events
    test = ends[ok] - 1
    valid = ends[ok] - 2
    train = np.ones(len(ds), bool)
    train[test] = False
    train[valid] = False
    return Split("leave-last-out", train, valid.astype(np.int64), test.astype(np.int64),
                 {"users_evaluated": int(ok.sum()), "users_too_short": int((~ok).sum()),
                  "min_events": min_events})


def global_temporal(ds: Dataset, test_quantile: float = 0.8, valid_quantile: float = 0.7) -> Split:
    """Cuts at time quantiles of all events; a user is evaluated if they have history before
    the cut and an event after it."""
    if not 0 < valid_quantile < test_quantile < 1:
        raise ValueError("need 0 < valid_quantile < test_quantile < 1")
    t_test = float(np.quantile(ds.timestamp, test_quantile))
    t_valid = float(np.quantile(ds.timestamp, valid_quantile))
    starts, ends = _user_bounds(ds)

    def first_after(cut: float) -> np.ndarray:
        out = []
        for s, e in zip(starts, ends):
            j = s + int(np.searchsorted(ds.timestamp[s:e], cut, side="right"))
            if s < j < e:  # has history before the cut and an event after it
                out.append(j)
        return np.asarray(out, np.int64)

    train = ds.timestamp <= t_valid
    return Split("global-temporal", train, first_after(t_valid), first_after(t_test),
                 {"test_cut": t_test, "valid_cut": t_valid,
                  "note": "train = events at or before the validation cut; for test the model "
                          "may use all history before the test cut as input, not for training"})


TIE_ORDERS = ("item", "random")


def shuffle_ties(ds: Dataset, seed: int = 0) -> Dataset:
    """The dataset with each user's same-timestamp events in a seeded random order (users and
    timestamps keep their order). Marks `extras["tie_order"]` so `Dataset.validate` accepts
    it. Per-event ground truth (the synthetic world's) cannot follow, so a dataset that has
    it and has ties is refused."""
    same = (np.diff(ds.user) == 0) & (np.diff(ds.timestamp) == 0)
    if not same.any():
        return ds
    if isinstance(ds.extras, dict) and "truth" in ds.extras:
        raise ValueError(f"dataset {ds.name}: random tie order would misalign its per-event "
                         "ground truth; use the item-id tie order")
    key = np.random.default_rng(seed).permutation(len(ds))
    order = np.lexsort((key, ds.timestamp, ds.user))
    extras = {**ds.extras, "tie_order": f"random (seed {seed})"}
    return replace(ds, user=ds.user[order], item=ds.item[order], timestamp=ds.timestamp[order],
                   rating=ds.rating[order], text=[ds.text[i] for i in order], extras=extras)


def tie_share(ds: Dataset) -> float:
    """Share of consecutive event pairs of the same user that share a timestamp."""
    same_user = np.diff(ds.user) == 0
    return float(((np.diff(ds.timestamp) == 0) & same_user).sum() / max(same_user.sum(), 1))
