"""The synthetic world: deterministic, valid, and its ground truth behaves as documented."""

from __future__ import annotations

import re

import numpy as np
import pytest
from fedinterest.shared.errors import ConfigError
from fedinterest.simulations.data.synthetic import (
    _DESCRIPTION_TEMPLATES,
    _NOTE_TEMPLATES,
    _TITLE_TEMPLATES,
    FILLER_ADJECTIVES,
    FILLER_NOUNS,
    THEMES,
    SyntheticConfig,
    future_topic_distribution,
    generate_world,
    interest_at,
    user_kinds,
)

WORD_TOPIC = {w: t for t, words in THEMES.items() for w in words}


@pytest.fixture(scope="module")
def ds():
    return generate_world(seed=3)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _tv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(a - b).sum(-1)


def test_vocabularies_are_disjoint_single_words_and_apart_from_template_words():
    seen: dict[str, str] = {}
    for topic, words in THEMES.items():
        assert len(words) >= 30, topic
        for w in words:
            assert re.fullmatch(r"[a-z0-9]+", w), (topic, w)
            assert w not in seen, f"'{w}' in both {seen[w]} and {topic}"
            seen[w] = topic
    scaffold = set(FILLER_ADJECTIVES) | set(FILLER_NOUNS)
    for template in _TITLE_TEMPLATES + _DESCRIPTION_TEMPLATES + _NOTE_TEMPLATES:
        scaffold |= set(_words(re.sub(r"\{\w+\}", " ", template)))
    assert not scaffold & set(seen), scaffold & set(seen)


def test_same_seed_same_world_different_seed_different_world(ds):
    again = generate_world(seed=3)
    other = generate_world(seed=4)
    for col in ("user", "item", "timestamp"):
        assert np.array_equal(getattr(ds, col), getattr(again, col))
    assert np.array_equal(ds.rating, again.rating, equal_nan=True)
    assert ds.text == again.text
    assert ds.catalog.texts == again.catalog.texts and ds.catalog.topics == again.catalog.topics
    for key, value in ds.extras["truth"].items():
        assert np.array_equal(np.asarray(value), np.asarray(again.extras["truth"][key])), key
    assert ds.extras["config"] == again.extras["config"]

    assert not np.array_equal(ds.item, other.item)
    assert not np.array_equal(ds.timestamp, other.timestamp)
    assert ds.catalog.texts != other.catalog.texts
    assert ds.text != other.text


def test_world_is_a_valid_canonical_dataset(ds):
    ds.validate()
    assert ds.name == "synthetic"
    assert ds.n_users == 300 and len(ds.catalog) == 1000 and len(ds) == 300 * 50
    order = np.lexsort((ds.item, ds.timestamp, ds.user))
    assert np.array_equal(order, np.arange(len(ds)))
    truth = ds.extras["truth"]
    assert truth["interest"].shape == (len(ds), 12) and truth["interest"].dtype == np.float32
    assert np.allclose(truth["interest"].sum(1), 1, atol=1e-5)
    assert ds.extras["config"]["seed"] == 3
    # catalog topics are the item's topic names, main topic first
    names = truth["topics"]
    assert all(ts[0] == names[m] for ts, m in zip(ds.catalog.topics, truth["item_topic"]))
    assert {len(ts) for ts in ds.catalog.topics} == {1, 2}
    ratings = ds.rating[~np.isnan(ds.rating)]
    assert set(np.unique(ratings)) <= {1, 2, 3, 4, 5}


def test_no_item_repeats_within_a_user(ds):
    for _, s in ds.user_slices():
        assert len(np.unique(ds.item[s])) == s.stop - s.start


def test_timestamps_stay_in_the_window_and_include_ties_and_long_gaps(ds):
    c = SyntheticConfig()
    assert ds.timestamp.min() >= c.time_start
    assert ds.timestamp.max() <= c.time_start + c.time_window_days * 86_400
    same_user = ds.user[1:] == ds.user[:-1]
    gaps = np.diff(ds.timestamp)[same_user]
    assert (gaps >= 0).all()
    assert 0.02 < (gaps == 0).mean() < 0.1  # tie-breaking matters
    assert (gaps < 60).mean() > 0.1 and (gaps > 7 * 86_400).mean() > 0.05  # seconds to weeks


def test_kinds_follow_the_configured_mix(ds):
    kinds = user_kinds(ds)
    assert {k: int((kinds == k).sum()) for k in ("stable", "drift", "shift")} == {
        "stable": 120, "drift": 90, "shift": 90,
    }
    only_drift = generate_world(n_users=20, mix_stable=0, mix_shift=0, mix_drift=1)
    assert set(user_kinds(only_drift)) == {"drift"}


def test_drifting_users_change_their_observed_topics_more_than_stable_users(ds):
    truth = ds.extras["truth"]
    k = len(truth["topics"])
    kinds = user_kinds(ds)
    dist = {"stable": [], "drift": []}
    for u, s in ds.user_slices():
        if kinds[u] in dist:
            topics = truth["item_topic"][ds.item[s]]
            first = np.bincount(topics[:10], minlength=k) / 10
            last = np.bincount(topics[-10:], minlength=k) / 10
            dist[kinds[u]].append(_tv(first, last))
    stable, drift = np.mean(dist["stable"]), np.mean(dist["drift"])
    assert drift > stable + 0.25, (stable, drift)


def test_ground_truth_paths_per_kind(ds):
    truth = ds.extras["truth"]
    kinds, shift_at = user_kinds(ds), truth["shift_at"]
    for u, s in ds.user_slices():
        p = truth["interest"][s]
        steps = _tv(p[1:], p[:-1])
        if kinds[u] == "stable":
            assert steps.max() < 1e-6 and shift_at[u] == -1
        elif kinds[u] == "drift":
            assert steps.max() < 0.1 and _tv(p[0], p[-1]) > 0.5 and shift_at[u] == -1
        else:
            j = shift_at[u]
            assert 0.3 * len(p) - 1 <= j <= 0.7 * len(p)
            assert _tv(p[j - 1], p[j]) > 0.8  # abrupt: a disjoint topic set
            assert np.delete(steps, j - 1).max() < 1e-6  # and flat on either side
            # the new regime starts strictly later, so no tie mixes the two regimes
            assert ds.timestamp[s][j] > ds.timestamp[s][j - 1]


def test_notes_use_words_of_the_users_current_topics(ds):
    truth = ds.extras["truth"]
    names, floor = truth["topics"], SyntheticConfig().note_min_interest
    noted = [i for i, t in enumerate(ds.text) if t is not None]
    assert 0.27 < len(noted) / len(ds) < 0.33
    for i in noted:
        p = truth["interest"][i]
        current = {names[t] for t in np.flatnonzero(p >= min(floor, p.max()) - 1e-6)}
        topic_words = [w for w in _words(ds.text[i]) if w in WORD_TOPIC]
        assert topic_words, ds.text[i]
        assert {WORD_TOPIC[w] for w in topic_words} <= current, (ds.text[i], current)


def test_item_text_reveals_its_main_topic(ds):
    truth = ds.extras["truth"]
    hits = 0
    for text, main in zip(ds.catalog.texts, truth["item_topic"]):
        counts: dict[str, int] = {}
        for w in _words(text):
            if w in WORD_TOPIC:
                counts[WORD_TOPIC[w]] = counts.get(WORD_TOPIC[w], 0) + 1
        hits += max(counts, key=counts.get) == truth["topics"][main]
    assert hits / len(ds.catalog) > 0.9


def test_ratings_rise_with_how_well_the_item_matches_current_interest(ds):
    truth = ds.extras["truth"]
    match = (truth["interest"] * truth["item_topic_weights"][ds.item]).sum(1)
    assert np.corrcoef(match, ds.rating)[0, 1] > 0.4


def test_popularity_is_skewed(ds):
    counts = np.sort(np.bincount(ds.item, minlength=len(ds.catalog)))[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()


def test_future_topic_distribution_averages_the_next_events_of_the_same_user(ds):
    interest = ds.extras["truth"]["interest"]
    assert np.allclose(future_topic_distribution(ds, 10, horizon=5), interest[10:15].mean(0))
    assert np.allclose(interest_at(ds, 10), interest[10])
    last = 49  # user 0's last event: the horizon stops at the user's end
    assert np.allclose(future_topic_distribution(ds, last - 1, horizon=5), interest[48:50].mean(0))
    many = future_topic_distribution(ds, np.array([10, last - 1]), horizon=5)
    assert many.shape == (2, 12) and np.allclose(many[1], interest[48:50].mean(0))
    with pytest.raises(ConfigError, match="horizon"):
        future_topic_distribution(ds, 0, horizon=0)
    with pytest.raises(ConfigError, match="aligned"):
        future_topic_distribution(ds.subset(ds.user < 5), 0)


def test_variable_history_lengths():
    world = generate_world(n_users=200, events_per_user=40, events_per_user_min=5, seed=1)
    lengths = np.bincount(world.user, minlength=world.n_users)
    assert lengths.min() >= 5 and lengths.max() <= 40 and len(np.unique(lengths)) > 10
    assert np.median(lengths) < 22  # log-uniform: more short histories than long ones
    shift_at, kinds = world.extras["truth"]["shift_at"], user_kinds(world)
    shifters = kinds == "shift"
    assert ((shift_at[shifters] >= 1) & (shift_at[shifters] < lengths[shifters])).all()


def test_thousand_users_by_fifty_events_generates():
    world = generate_world(n_users=1000, events_per_user=50)
    assert len(world) == 50_000
    assert (np.bincount(world.user) == 50).all()


def test_unknown_or_bad_config_keys_raise_config_error():
    with pytest.raises(ConfigError, match="n_userz"):
        generate_world(n_userz=10)
    with pytest.raises(ConfigError, match="colour"):
        SyntheticConfig.from_dict({"seed": 1, "colour": "red"})
    with pytest.raises(ConfigError, match="n_items"):
        generate_world(n_items=10, events_per_user=50)
    with pytest.raises(ConfigError, match="n_topics"):
        generate_world(n_topics=len(THEMES) + 1)
    with pytest.raises(ConfigError, match="note_share"):
        generate_world(note_share=1.5)
    with pytest.raises(ConfigError, match="n_users"):
        generate_world(n_users="300")
    assert SyntheticConfig.from_dict({"seed": 5}).seed == 5
