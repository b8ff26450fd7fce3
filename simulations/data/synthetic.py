"""The synthetic world: a catalog and users whose interests are known, so that interest modelling
can be scored against the truth instead of only against held-out clicks.

Items carry English text drawn from themed word lists (cooking, astronomy, jazz, ...), so a real
sentence encoder recovers their topics. Users are of three kinds: stable (one topic mixture),
drift (a gradual move from one mixture to a disjoint one) and shift (an abrupt switch at a random
point). Every event is drawn from the user's interest at that moment; about a third carry a
private note written from the user's *current* topics, so private text tells the model where
interest is going. The truth (interest per event, kinds, shift points) is in `extras["truth"]`.

Deterministic by seed: each ingredient (catalog, users, events, times, ratings, notes) draws from
its own child of one SeedSequence, so changing e.g. the note share leaves the events unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from fedinterest.shared.errors import ConfigError
from fedinterest.shared.schema import Catalog, Dataset

from .synthetic_vocabulary import (
    _DESCRIPTION_TEMPLATES,
    _NOTE_TEMPLATES,
    _TITLE_TEMPLATES,
    FILLER_ADJECTIVES,
    FILLER_NOUNS,
    THEMES,
)

_KINDS = ("stable", "drift", "shift")
_DAY = 86_400


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic world. Every default gives a world a laptop builds in a second."""

    seed: int = 0
    n_users: int = 300
    n_items: int = 1000
    n_topics: int = 12  # the first n themes of THEMES
    events_per_user: int = 50
    # when set, history lengths are log-uniform in [events_per_user_min, events_per_user]
    # (many short histories, few long ones, as in real logs); None = every user has the maximum
    events_per_user_min: int | None = None
    # relative weights of the user kinds (normalised; exact counts by largest remainder)
    mix_stable: float = 0.4
    mix_drift: float = 0.3
    mix_shift: float = 0.3
    topics_per_user_max: int = 3  # each interest mixture puts its mass on 1..this many topics
    interest_concentration: float = 1.0  # Dirichlet alpha over a mixture's topics
    interest_background: float = 0.05  # mass spread over all topics (exploration)
    shift_window: tuple[float, float] = (0.3, 0.7)  # where in a history a shift may happen
    second_topic_share: float = 0.25  # items that also belong to a second topic
    zipf_exponent: float = 1.0  # item popularity ~ 1 / rank**exponent
    text_noise: float = 0.1  # share of an item's description words taken from other topics
    note_share: float = 0.3  # events with a private note
    note_min_interest: float = 0.1  # a note's topics have at least this much current interest
    rated_share: float = 1.0  # events with a rating (others NaN)
    rating_noise: float = 0.7  # std of the Gaussian noise on the latent rating score
    time_start: int = 1_577_836_800  # 2020-01-01 UTC
    time_window_days: float = 240.0  # every event falls in [time_start, time_start + window]
    session_continue: float = 0.5  # chance that the next event is in the same session
    tie_share: float = 0.05  # gaps that are exactly zero (identical timestamps)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_dict(cls, values: dict) -> SyntheticConfig:
        """From a plain mapping (CLI, TOML); unknown keys are a ConfigError naming the key."""
        return cls().replace(**values)

    def replace(self, **overrides) -> SyntheticConfig:
        names = {f.name for f in dataclasses.fields(self)}
        for key in overrides:
            if key not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(f"synthetic world: unknown key '{key}'; expected one of {known}")
        if "shift_window" in overrides:
            overrides["shift_window"] = tuple(overrides["shift_window"])
        return dataclasses.replace(self, **overrides)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _validate(c: SyntheticConfig) -> None:
    def fail(key: str, expected: str) -> None:
        raise ConfigError(f"synthetic world: '{key}' = {getattr(c, key)!r}; expected {expected}")

    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)

    for key in ("seed", "n_users", "n_items", "n_topics", "events_per_user",
                "topics_per_user_max", "time_start"):
        if not is_int(getattr(c, key)):
            fail(key, "an integer")
    for key in ("mix_stable", "mix_drift", "mix_shift", "interest_concentration",
                "interest_background", "second_topic_share", "zipf_exponent", "text_noise",
                "note_share", "note_min_interest", "rated_share", "rating_noise",
                "time_window_days", "session_continue", "tie_share"):
        v = getattr(c, key)
        if not is_num(v) or not np.isfinite(v):
            fail(key, "a finite number")
    if c.seed < 0:
        fail("seed", "a non-negative integer")
    if c.n_users < 1:
        fail("n_users", "at least 1")
    if not 2 <= c.n_topics <= len(THEMES):
        fail("n_topics", f"between 2 and {len(THEMES)} (the number of themed word lists)")
    if c.events_per_user < 2:
        fail("events_per_user", "at least 2")
    if c.n_items < c.events_per_user:
        fail("n_items", f"at least events_per_user ({c.events_per_user}): items never repeat")
    if c.events_per_user_min is not None and (
        not is_int(c.events_per_user_min) or not 2 <= c.events_per_user_min <= c.events_per_user
    ):
        fail("events_per_user_min", f"None or an integer in [2, {c.events_per_user}]")
    mix = (c.mix_stable, c.mix_drift, c.mix_shift)
    for key, v in zip(("mix_stable", "mix_drift", "mix_shift"), mix):
        if v < 0:
            fail(key, "a non-negative weight")
    if sum(mix) <= 0:
        fail("mix_stable", "mix_stable + mix_drift + mix_shift > 0")
    if not 1 <= c.topics_per_user_max <= c.n_topics // 2:
        fail("topics_per_user_max",
             f"in [1, n_topics // 2 = {c.n_topics // 2}] (drift and shift need a disjoint set)")
    if c.interest_concentration <= 0:
        fail("interest_concentration", "> 0")
    sw = c.shift_window
    if (not isinstance(sw, tuple) or len(sw) != 2 or not all(is_num(x) for x in sw)
            or not 0 < sw[0] <= sw[1] < 1):
        fail("shift_window", "two numbers 0 < low <= high < 1")
    for key in ("interest_background", "second_topic_share", "text_noise", "note_share",
                "rated_share", "session_continue", "tie_share"):
        if not 0 <= getattr(c, key) <= 1:
            fail(key, "a share in [0, 1]")
    if not 0 < c.note_min_interest <= 1:
        fail("note_min_interest", "in (0, 1]")
    if c.zipf_exponent < 0:
        fail("zipf_exponent", ">= 0")
    if c.rating_noise < 0:
        fail("rating_noise", ">= 0")
    if c.time_window_days <= 0:
        fail("time_window_days", "> 0")


# --------------------------------------------------------------------------- catalog


def _make_catalog(c: SyntheticConfig, rng: np.random.Generator):
    """Items with a main topic (sometimes a second), Zipf popularity and themed text.

    Returns (catalog rows, main topic [N], membership [K, N] bool, topic weights [N, K],
    popularity [N]). Popularity ranks are a random permutation, so item ids say nothing.
    """
    n, k = c.n_items, c.n_topics
    names = list(THEMES)[:k]
    vocab = [THEMES[t] for t in names]
    # balanced main topics (each topic gets n // k or n // k + 1 items), in random order
    main = rng.permutation(np.arange(n) % k)
    has_second = rng.random(n) < c.second_topic_share
    second = (main + rng.integers(1, k, n)) % k  # always differs from main
    second = np.where(has_second, second, -1)
    membership = np.zeros((k, n), bool)
    membership[main, np.arange(n)] = True
    membership[second[has_second], np.flatnonzero(has_second)] = True
    weights = np.zeros((n, k), np.float32)
    weights[np.arange(n), main] = np.where(has_second, 0.7, 1.0)
    weights[np.flatnonzero(has_second), second[has_second]] = 0.3
    rank = rng.permutation(n) + 1
    popularity = 1.0 / rank.astype(np.float64) ** c.zipf_exponent
    popularity /= popularity.sum()

    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    width = max(4, len(str(n - 1)))
    for i in range(n):
        t_main, t_second = int(main[i]), int(second[i])
        # description: 6 topic words, ~30% from the second topic, text_noise from any topic
        src = np.full(6, t_main)
        if t_second >= 0:
            src[rng.random(6) < 0.3] = t_second
        noisy = rng.random(6) < c.text_noise
        src[noisy] = rng.integers(0, k, int(noisy.sum()))
        words = [""] * 6
        for s in np.unique(src):  # distinct words within each topic
            at = np.flatnonzero(src == s)
            for j, w in zip(at, rng.choice(len(vocab[s]), len(at), replace=False)):
                words[j] = vocab[s][w]
        title_words = [_pick(rng, vocab[t_main]) for _ in range(3)]
        adj, noun = _pick(rng, FILLER_ADJECTIVES), _pick(rng, FILLER_NOUNS)
        title = _pick(rng, _TITLE_TEMPLATES).format(
            A=title_words[0].title(), B=title_words[1].title(), C=title_words[2].title(),
            adj=adj, noun=noun, a_adj=_article(adj), A_noun=_article(noun).title(),
        )
        adj = _pick(rng, FILLER_ADJECTIVES)
        slots = {f"w{j}": w for j, w in enumerate(words)} | {"W0": words[0].capitalize()}
        desc = _pick(rng, _DESCRIPTION_TEMPLATES).format(
            adj=adj, A_adj=_article(adj).title(), noun=_pick(rng, FILLER_NOUNS), **slots
        )
        topics = (names[t_main],) + ((names[t_second],) if t_second >= 0 else ())
        rows[f"item{i:0{width}d}"] = (f"{title}. {desc}", topics)
    return rows, main, membership, weights, popularity


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --------------------------------------------------------------------------- users


def _user_mixtures(c: SyntheticConfig, rng: np.random.Generator):
    """Kinds, lengths, start/end topic mixtures [U, K] and shift points per user."""
    u, k = c.n_users, c.n_topics
    mix = np.array([c.mix_stable, c.mix_drift, c.mix_shift], float)
    counts = _largest_remainder(mix / mix.sum(), u)
    kind = rng.permutation(np.repeat(np.arange(3), counts))

    if c.events_per_user_min is None:
        length = np.full(u, c.events_per_user, np.int64)
    else:
        lo, hi = np.log(c.events_per_user_min), np.log(c.events_per_user + 1)
        length = np.floor(np.exp(rng.uniform(lo, hi, u))).astype(np.int64)
        length = np.clip(length, c.events_per_user_min, c.events_per_user)

    def mixture(exclude: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        chosen = np.zeros((u, k), bool)
        n_core = rng.integers(1, c.topics_per_user_max + 1, u)
        # random topic order per user, excluded topics pushed to the end
        keys = rng.random((u, k)) + (exclude if exclude is not None else 0)
        order = np.argsort(keys, axis=1)
        for j in range(c.topics_per_user_max):
            rows = np.flatnonzero(n_core > j)
            chosen[rows, order[rows, j]] = True
        alpha = np.full(k, c.interest_concentration)
        core = rng.dirichlet(alpha, u) * chosen
        core /= core.sum(1, keepdims=True)
        return (1 - c.interest_background) * core + c.interest_background / k, chosen

    start, start_set = mixture(None)
    end, _ = mixture(start_set.astype(float) * 2.0)  # disjoint topic set for drift/shift
    end[kind == 0] = start[kind == 0]
    lo, hi = c.shift_window
    shift_at = np.floor(length * rng.uniform(lo, hi, u)).astype(np.int64)
    shift_at = np.clip(shift_at, 1, length - 1)
    shift_at[kind != 2] = -1
    return kind, length, start, end, shift_at


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    raw = shares * total
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts


def _interest_paths(kind, length, start, end, shift_at, max_len: int) -> np.ndarray:
    """Interest of each user at each step [U, L, K]; steps past a user's length are unused."""
    t = np.arange(max_len)[None, :]
    frac = np.zeros((len(kind), max_len))
    drift = kind == 1
    frac[drift] = np.clip(t / np.maximum(length[drift, None] - 1, 1), 0, 1)
    shift = kind == 2
    frac[shift] = (t >= shift_at[shift, None]).astype(float)
    return (1 - frac)[..., None] * start[:, None, :] + frac[..., None] * end[:, None, :]


def _draw_items(interest, length, membership, popularity, rng, chunk_cells: int = 4_000_000):
    """Per step: a topic from the current interest, then an unseen item of that topic weighted
    by popularity. Vectorised over users (in chunks that bound memory to ~chunk_cells floats)."""
    u, max_len, _ = interest.shape
    n = len(popularity)
    items = np.full((u, max_len), -1, np.int64)
    chunk = max(1, chunk_cells // n)
    for lo in range(0, u, chunk):
        hi = min(u, lo + chunk)
        rows = np.arange(hi - lo)
        used = np.zeros((hi - lo, n), bool)
        for t in range(max_len):
            p = interest[lo:hi, t]
            topic = (rng.random(hi - lo)[:, None] > np.cumsum(p, 1)[:, :-1]).sum(1)
            w = popularity[None, :] * membership[topic] * ~used
            empty = w.sum(1) == 0  # topic exhausted for this user: any unseen item
            if empty.any():
                w[empty] = popularity[None, :] * ~used[empty]
            cum = np.cumsum(w, 1)
            r = rng.random(hi - lo) * cum[:, -1]
            pick = (cum <= r[:, None]).sum(1)
            active = t < length[lo:hi]
            items[lo:hi, t] = np.where(active, pick, -1)
            used[rows[active], pick[active]] = True
    return items


def _timestamps(c: SyntheticConfig, length, shift_at, rng) -> np.ndarray:
    """Irregular gaps (seconds within a session, hours to weeks between sessions, some exact
    ties), each history placed at a random spot in the global window [U, L]."""
    u, max_len = len(length), int(length.max())
    window = int(c.time_window_days * _DAY)
    in_session = rng.random((u, max_len)) < c.session_continue
    short = np.exp(rng.uniform(np.log(5), np.log(3600), (u, max_len)))  # 5 s .. 1 h
    long = np.exp(rng.uniform(np.log(3600), np.log(30 * _DAY), (u, max_len)))  # 1 h .. 30 d
    gaps = np.where(in_session, short, long)
    gaps[rng.random((u, max_len)) < c.tie_share] = 0.0
    gaps[:, 0] = 0.0  # first event: no gap
    steps = np.arange(max_len)[None, :]
    gaps[steps >= length[:, None]] = 0.0
    # a shift happens between sessions, never inside a tie, so canonical order keeps regimes apart
    has_shift = shift_at >= 0
    gaps[np.flatnonzero(has_shift), shift_at[has_shift]] = np.maximum(
        gaps[np.flatnonzero(has_shift), shift_at[has_shift]], 3600.0
    )
    span = gaps.sum(1)
    budget = 0.95 * window
    scale = np.minimum(1.0, budget / np.maximum(span, 1.0))
    nonzero = gaps > 0
    gaps = np.where(nonzero, np.maximum(1, np.round(gaps * scale[:, None])), 0).astype(np.int64)
    offsets = np.cumsum(gaps, 1)
    room = np.maximum(window - offsets[:, -1], 0)
    start = c.time_start + np.floor(rng.random(u) * (room + 1)).astype(np.int64)
    return start[:, None] + offsets


def _ratings(c: SyntheticConfig, interest_ev, item_weights, rng) -> np.ndarray:
    """1..5 stars: higher the more of the current interest sits on the item's topics."""
    match = (interest_ev * item_weights).sum(1) / interest_ev.max(1)
    score = 1.0 + 4.0 * match + rng.normal(0.0, c.rating_noise, len(match))
    rating = np.clip(np.round(score), 1, 5).astype(np.float32)
    rating[rng.random(len(rating)) >= c.rated_share] = np.nan
    return rating


def _notes(c: SyntheticConfig, interest_ev, names, rng) -> list[str | None]:
    """Short first-person notes for a share of events, from the user's current topics only."""
    n = len(interest_ev)
    has_note = rng.random(n) < c.note_share
    idx = np.flatnonzero(has_note)
    p = interest_ev[idx].astype(np.float64)
    floor = np.minimum(c.note_min_interest, p.max(1, keepdims=True))
    q = np.where(p >= floor - 1e-9, p, 0.0)
    cum = np.cumsum(q / q.sum(1, keepdims=True), 1)
    topic_a = (rng.random(len(idx))[:, None] > cum[:, :-1]).sum(1)
    topic_b = (rng.random(len(idx))[:, None] > cum[:, :-1]).sum(1)
    template = rng.integers(0, len(_NOTE_TEMPLATES), len(idx))
    pick_a, pick_b = rng.random(len(idx)), rng.random(len(idx))
    vocab = [THEMES[t] for t in names]
    out: list[str | None] = [None] * n
    for j, e in enumerate(idx):
        va, vb = vocab[topic_a[j]], vocab[topic_b[j]]
        a = va[int(pick_a[j] * len(va))]
        b = vb[int(pick_b[j] * len(vb))]
        if a == b:  # same topic twice: take the next word so the note reads naturally
            b = vb[(int(pick_b[j] * len(vb)) + 1) % len(vb)]
        out[e] = _NOTE_TEMPLATES[template[j]].format(a=a, b=b)
    return out


# --------------------------------------------------------------------------- entry points


def generate_world(config: SyntheticConfig | None = None, **overrides) -> Dataset:
    """Builds the synthetic dataset ("synthetic"); overrides replace config fields by name."""
    c = config or SyntheticConfig()
    if overrides:
        c = c.replace(**overrides)
    r_catalog, r_users, r_items, r_times, r_ratings, r_notes = (
        np.random.default_rng(s) for s in np.random.SeedSequence(c.seed).spawn(6)
    )
    names = list(THEMES)[: c.n_topics]
    rows, main, membership, item_weights, popularity = _make_catalog(c, r_catalog)
    catalog = Catalog.build(rows)  # ids are zero-padded, so catalog index == generation index

    kind, length, start, end, shift_at = _user_mixtures(c, r_users)
    max_len = int(length.max())
    paths = _interest_paths(kind, length, start, end, shift_at, max_len)
    items = _draw_items(paths, length, membership, popularity, r_items)
    times = _timestamps(c, length, shift_at, r_times)

    valid = np.arange(max_len)[None, :] < length[:, None]
    user = np.broadcast_to(np.arange(c.n_users)[:, None], valid.shape)[valid]
    item, ts = items[valid], times[valid]
    step = np.broadcast_to(np.arange(max_len)[None, :], valid.shape)[valid]
    # canonical order (user, timestamp, item), applied here so the truth lines up with events
    order = np.lexsort((item, ts, user))
    user, item, ts, step = user[order], item[order], ts[order], step[order]
    interest_ev = paths[user, step].astype(np.float32)

    rating = _ratings(c, interest_ev, item_weights[item], r_ratings)
    text = _notes(c, interest_ev, names, r_notes)

    width = max(5, len(str(c.n_users - 1)))
    user_ids = [f"user{i:0{width}d}" for i in range(c.n_users)]
    # a shift point as a position in the user's canonical history: the first event of the new
    # regime (the forced gap before it keeps it there after sorting)
    truth = {
        "topics": names,
        "interest": interest_ev,  # float32 [n_events, n_topics], canonical event order
        "kind": np.array([_KINDS[i] for i in kind]),
        "shift_at": shift_at,  # per user; -1 for stable and drift users
        "interest_start": start.astype(np.float32),  # [n_users, n_topics]
        "interest_end": end.astype(np.float32),
        "item_topic": main.astype(np.int32),  # main topic index per catalog item
        "item_topic_weights": item_weights,  # [n_items, n_topics]
        "popularity": popularity.astype(np.float32),  # latent, sums to 1
        "n_events": len(user),
    }
    return Dataset.from_events(
        "synthetic", catalog, user_ids, user, item, ts, rating=rating, text=text,
        extras={"truth": truth, "config": c.as_dict()},
    )


def _truth(ds: Dataset) -> dict:
    truth = ds.extras.get("truth") if isinstance(ds.extras, dict) else None
    if truth is None:
        raise ConfigError(f"dataset {ds.name!r} has no ground truth: use generate_world()")
    if truth["n_events"] != len(ds):
        raise ConfigError(
            f"dataset {ds.name!r}: ground truth covers {truth['n_events']} events but the dataset "
            f"has {len(ds)}; it is aligned with the full dataset generate_world() returned, "
            "so index that one (e.g. with a Split) rather than a subset"
        )
    return truth


def user_kinds(ds: Dataset) -> np.ndarray:
    """'stable' / 'drift' / 'shift' per user index."""
    return _truth(ds)["kind"]


def interest_at(ds: Dataset, event_index: int | np.ndarray) -> np.ndarray:
    """Ground-truth topic distribution of the user at the given event(s)."""
    return _truth(ds)["interest"][event_index]


def future_topic_distribution(
    ds: Dataset, event_index: int | np.ndarray, horizon: int = 5
) -> np.ndarray:
    """Mean ground-truth interest over the user's events event_index .. event_index+horizon-1
    (cut at the user's last event): what a model that has seen the strictly earlier history
    (the splits' convention for a target event) should predict. [n_topics] or [n, n_topics]."""
    if horizon < 1:
        raise ConfigError(f"future_topic_distribution: horizon = {horizon}; expected >= 1")
    interest = _truth(ds)["interest"].astype(np.float64)
    idx = np.asarray(event_index, np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise ConfigError(f"future_topic_distribution: event index outside [0, {len(ds)})")
    user_end = np.searchsorted(ds.user, ds.user[idx], side="right")
    end = np.minimum(idx + horizon, user_end)
    cs = np.concatenate([np.zeros((1, interest.shape[1])), np.cumsum(interest, 0)])
    out = (cs[end] - cs[idx]) / (end - idx)[..., None]
    return out.astype(np.float32)
