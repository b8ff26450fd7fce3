"""Dataset loaders: every format on small files written here, malformed input, the dispatcher,
and the real ml-latest-small numbers when that folder is present."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
from fedinterest.shared.errors import ConfigError, DataError
from fedinterest.simulations.data import (
    default_movielens_path,
    load_amazon,
    load_dataset,
    load_generic_csv,
    load_ml1m,
    load_ml100k,
    load_movielens_csv,
    parse_mapping,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MOVIES = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children
9,"American President, The (1995)",Comedy|Drama|Romance
10,"Movie with ""quotes"", and commas (2001)",(no genres listed)
2,Jumanji (1995),Adventure|Fantasy
"""
RATINGS = """userId,movieId,rating,timestamp
10,2,3.5,300
10,10,4.0,100
10,9,5.0,100
9,1,1.0,50
9,999,2.0,60
9,2,2.5,40
"""
TAGS = """userId,movieId,tag,timestamp
10,10,funny,500
10,10,classic,400
9,1,toys,55
9,9,never rated this,70
"""


def write(path: Path, text: str | bytes, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        text = text.encode(encoding)
    path.write_bytes(text)
    return path


def movielens_dir(tmp_path: Path, ratings: str = RATINGS, movies: str = MOVIES,
                  tags: str | None = TAGS) -> Path:
    d = tmp_path / "ml"
    write(d / "movies.csv", movies)
    write(d / "ratings.csv", ratings)
    if tags is not None:
        write(d / "tags.csv", tags)
    return d


def events(ds) -> list[tuple[str, str, int]]:
    return [(ds.user_ids[u], ds.catalog.item_ids[i], int(t))
            for u, i, t in zip(ds.user, ds.item, ds.timestamp)]


def assert_error(exc: pytest.ExceptionInfo, file: str, line: int | None, field: str | None):
    msg = str(exc.value)
    assert file in msg, msg
    assert exc.value.line == line, msg
    assert exc.value.field == field, msg
    if line is not None:
        assert f"line {line}" in msg
    if field is not None:
        assert f"field '{field}'" in msg


# ---- MovieLens CSV ----------------------------------------------------------------------


def test_movielens_csv_catalog_order_tags_and_skips(tmp_path):
    ds = load_movielens_csv(movielens_dir(tmp_path))
    # catalog and users in numeric id order: "9" before "10"
    assert ds.catalog.item_ids == ["1", "2", "9", "10"]
    assert ds.user_ids == ["9", "10"]
    assert ds.catalog.texts[2] == "American President, The (1995). Genres: Comedy, Drama, Romance"
    assert ds.catalog.texts[3] == 'Movie with "quotes", and commas (2001)'
    assert ds.catalog.topics[3] == ()
    # canonical order: user, then time, ties by item id numerically (9 before 10 at t=100)
    assert events(ds) == [
        ("9", "2", 40), ("9", "1", 50),
        ("10", "9", 100), ("10", "10", 100), ("10", "2", 300),
    ]
    assert ds.rating.tolist() == [2.5, 1.0, 5.0, 4.0, 3.5]
    # tags: joined in time order on the rated event; a tag on an unrated movie is a note
    assert ds.text == [None, "toys", None, "classic; funny", None]
    assert len(ds.notes) == 1
    note = ds.notes[0]
    assert (ds.user_ids[note.user], ds.catalog.item_ids[note.item], note.text) == (
        "9", "9", "never rated this")
    assert ds.n_text_pieces == 4
    # the rating of an unknown movie is reported, not silently dropped
    assert ds.skipped.counts == {"ratings of movies not in movies.csv": 1}
    assert "999" in ds.skipped.summary()
    assert any("kept as notes" in line for line in ds.extras["load_info"])


def test_movielens_csv_without_tags(tmp_path):
    ds = load_movielens_csv(movielens_dir(tmp_path, tags=None))
    assert ds.n_text_pieces == 0 and ds.notes == [] and all(t is None for t in ds.text)


def test_movielens_orphan_tags_are_reported(tmp_path):
    tags = "userId,movieId,tag,timestamp\n77,1,stranger,5\n9,555,nowhere,6\n9,1, ,7\n"
    ds = load_movielens_csv(movielens_dir(tmp_path, tags=tags))
    assert ds.skipped.counts == {
        "ratings of movies not in movies.csv": 1,
        "tags in tags.csv by users with no rating": 1,
        "tags in tags.csv on movies not in movies.csv": 1,
        "empty tags in tags.csv": 1,
    }
    assert ds.n_text_pieces == 0


@pytest.mark.parametrize(
    ("ratings", "line", "field"),
    [
        (RATINGS.replace("10,10,4.0,100", "10,10,four,100"), 3, "rating"),
        (RATINGS.replace("9,1,1.0,50", "9,1,1.0,yesterday"), 5, "timestamp"),
        (RATINGS.replace("9,1,1.0,50", "9,1,1.0,99999999999999999999"), 5, "timestamp"),
        (RATINGS.replace("9,1,1.0,50", "9,1,nan,50"), 5, "rating"),
        (RATINGS.replace("9,2,2.5,40", ",2,2.5,40"), 7, "userId"),
        (RATINGS.replace("10,2,3.5,300", "10,2,3.5"), 2, None),
        (RATINGS.replace("10,9,5.0,100", "10,9,5.0,100,extra"), 4, None),
    ],
)
def test_movielens_malformed_rating_rows_name_file_line_field(tmp_path, ratings, line, field):
    with pytest.raises(DataError) as exc:
        load_movielens_csv(movielens_dir(tmp_path, ratings=ratings))
    assert_error(exc, "ratings.csv", line, field)


def test_movielens_structural_errors(tmp_path):
    with pytest.raises(DataError) as exc:  # missing column
        load_movielens_csv(movielens_dir(tmp_path, ratings="userId,movieId,timestamp\n1,1,5\n"))
    assert_error(exc, "ratings.csv", 1, "rating")
    assert "userId, movieId, timestamp" in str(exc.value)

    with pytest.raises(DataError) as exc:  # empty file
        load_movielens_csv(movielens_dir(tmp_path, movies=""))
    assert_error(exc, "movies.csv", None, None)
    assert "empty file" in str(exc.value)

    with pytest.raises(DataError) as exc:  # header but no rows
        load_movielens_csv(movielens_dir(tmp_path, ratings="userId,movieId,rating,timestamp\n"))
    assert "no usable events" in str(exc.value)

    with pytest.raises(DataError) as exc:  # duplicate movie id
        load_movielens_csv(movielens_dir(tmp_path, movies=MOVIES + "9,Again (2000),Drama\n"))
    assert_error(exc, "movies.csv", 6, "movieId")

    (movielens_dir(tmp_path) / "ratings.csv").unlink()
    with pytest.raises(DataError, match="ratings.csv: file not found"):
        load_movielens_csv(tmp_path / "ml")


def test_line_numbers_count_quoted_fields_that_span_lines(tmp_path):
    movies = 'movieId,title,genres\n1,"Two\nline title",Drama\n2,Fine,Drama\n2,Again,Drama\n'
    with pytest.raises(DataError) as exc:
        load_movielens_csv(movielens_dir(tmp_path, movies=movies))
    assert_error(exc, "movies.csv", 5, "movieId")


def test_movielens_undecodable_bytes_name_the_line(tmp_path):
    d = movielens_dir(tmp_path)
    raw = MOVIES.encode().replace(b"Jumanji", "Jümanji".encode("latin-1"))
    write(d / "movies.csv", raw)
    with pytest.raises(DataError) as exc:
        load_movielens_csv(d)
    assert_error(exc, "movies.csv", 5, None)
    assert "utf-8" in str(exc.value)


def test_movielens_blank_lines_are_reported(tmp_path):
    ds = load_movielens_csv(movielens_dir(tmp_path, ratings=RATINGS.replace("\n9,1,", "\n\n9,1,")))
    assert ds.skipped.counts["blank lines"] == 1
    assert len(ds) == 5


# ---- ml-100k and ml-1m ------------------------------------------------------------------


def ml100k_dir(tmp_path: Path, item_lines: list[str] | None = None) -> Path:
    d = tmp_path / "ml-100k"
    flags = ["0"] * 19
    comedy = list(flags)
    comedy[5] = "1"
    unknown = list(flags)
    unknown[0] = "1"
    items = item_lines or [
        "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(comedy),
        "2|Misérables, Les (1995)|01-Jan-1995||http://y|" + "|".join(unknown),
        "10|Ten (1995)|01-Jan-1995||http://z|" + "|".join(comedy),
    ]
    write(d / "u.item", "\n".join(items) + "\n", encoding="latin-1")
    write(d / "u.data", "5\t10\t3\t881250949\n5\t2\t4\t881250949\n3\t1\t5\t881250900\n")
    return d


def test_ml100k(tmp_path):
    ds = load_ml100k(ml100k_dir(tmp_path))
    assert ds.catalog.texts == [
        "Toy Story (1995). Genres: Comedy", "Misérables, Les (1995)", "Ten (1995). Genres: Comedy"]
    assert ds.catalog.topics[1] == ()  # ml-100k's "unknown" genre is no topic
    assert events(ds) == [("3", "1", 881250900), ("5", "2", 881250949), ("5", "10", 881250949)]
    assert ds.rating.tolist() == [5.0, 4.0, 3.0]


def test_ml100k_bad_genre_flag(tmp_path):
    line = "1|Toy Story (1995)|01-Jan-1995||http://x|" + "|".join(["0"] * 18 + ["yes"])
    with pytest.raises(DataError) as exc:
        load_ml100k(ml100k_dir(tmp_path, [line]))
    assert_error(exc, "u.item", 1, "Western")


def test_ml1m_with_tags(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "movies.dat", "1::Amélie (2001)::Comedy|Romance\n2::Heat (1995)::Action\n", "latin-1")
    write(d / "ratings.dat", "1::2::5::978300760\n1::1::3::978300700\n2::1::4::978300000\n")
    write(d / "tags.dat", "1::1::whimsical::978300800\n2::2::not rated::978300900\n")
    ds = load_ml1m(d)
    assert ds.catalog.texts[0] == "Amélie (2001). Genres: Comedy, Romance"
    assert events(ds) == [("1", "1", 978300700), ("1", "2", 978300760), ("2", "1", 978300000)]
    assert ds.text == ["whimsical", None, None]
    assert len(ds.notes) == 1 and ds.n_text_pieces == 2


def test_ml1m_malformed(tmp_path):
    d = tmp_path / "ml-1m"
    write(d / "movies.dat", "1::Heat (1995)::Action\n")
    write(d / "ratings.dat", "1::1::5::978300760\n1::1::5\n")
    with pytest.raises(DataError) as exc:
        load_ml1m(d)
    assert_error(exc, "ratings.dat", 2, None)


# ---- Amazon -----------------------------------------------------------------------------

REVIEWS = [
    {"reviewerID": "A2", "asin": "B01", "unixReviewTime": 1400000000, "overall": 5.0,
     "summary": "Great", "reviewText": "Loved it"},
    {"reviewerID": "A1", "asin": "B02", "unixReviewTime": 1300000000, "reviewText": "meh"},
    {"reviewerID": "A2", "asin": "B00", "unixReviewTime": 1400000000, "overall": 2},
]


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_amazon_gzip_with_python_literal_metadata(tmp_path):
    reviews = tmp_path / "reviews_Books_5.json.gz"
    with gzip.open(reviews, "wt", encoding="utf-8") as f:
        f.write(jsonl(REVIEWS))
    meta = write(tmp_path / "meta.json", (
        "{'asin': 'B01', 'title': 'A Book', 'categories': [['Books', 'Fiction']],"
        " 'description': 'About things.'}\n"
        '{"asin": "B02", "title": "Other", "category": ["Books"], "description": ["x", "y"]}\n'
        '{"asin": "B02", "title": "Duplicate"}\n'
        '{"asin": "B99", "title": "Never reviewed"}\n'
    ))
    ds = load_amazon(reviews, meta=meta)
    assert ds.name == "reviews_Books_5"
    assert ds.catalog.item_ids == ["B00", "B01", "B02", "B99"]
    assert ds.catalog.texts[:3] == [
        "B00", "A Book. Categories: Books, Fiction. About things.", "Other. Categories: Books. x y"]
    assert events(ds) == [("A1", "B02", 1300000000), ("A2", "B00", 1400000000),
                          ("A2", "B01", 1400000000)]
    assert ds.text == ["meh", None, "Great\nLoved it"]
    assert ds.rating[0] != ds.rating[0] and ds.rating[1:].tolist() == [2.0, 5.0]
    assert ds.skipped.counts == {"metadata lines repeating an asin in meta.json (first kept)": 1}
    assert "1 items have no metadata (not in meta.json)" in ds.extras["load_info"][0]
    only_reviewed = load_amazon(reviews, meta=meta, keep_unreviewed_items=False)
    assert only_reviewed.catalog.item_ids == ["B00", "B01", "B02"]


def test_amazon_without_metadata_falls_back_to_asin(tmp_path):
    ds = load_amazon(write(tmp_path / "r.jsonl", jsonl(REVIEWS)))
    assert ds.catalog.texts == ds.catalog.item_ids == ["B00", "B01", "B02"]
    assert "no metadata file given" in ds.extras["load_info"][0]


@pytest.mark.parametrize(
    ("line3", "field"),
    [
        ('{"reviewerID": "A3", "asin": "B01", "unixReviewTime": 1', None),
        ('["not", "an", "object"]', None),
        ('{"asin": "B01", "unixReviewTime": 1}', "reviewerID"),
        ('{"reviewerID": "A3", "asin": "B01", "unixReviewTime": "soon"}', "unixReviewTime"),
        ('{"reviewerID": "A3", "asin": "B01", "unixReviewTime": 1, "overall": "x"}', "overall"),
    ],
)
def test_amazon_malformed_lines(tmp_path, line3, field):
    path = write(tmp_path / "r.json", jsonl(REVIEWS[:2]) + line3 + "\n")
    with pytest.raises(DataError) as exc:
        load_amazon(path)
    assert_error(exc, "r.json", 3, field)


def test_amazon_empty_and_broken_gzip(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        load_amazon(write(tmp_path / "r.json", ""))
    with pytest.raises(DataError, match="cannot read"):
        load_amazon(write(tmp_path / "r.json.gz", b"not gzip at all"))


# ---- generic CSV ------------------------------------------------------------------------

GENERIC = """uid;iid;when;stars;review;title
u2;b;2021-01-01T00:00:00Z;4;nice;Bee
u1;a;1609459200;;;Ay
u2;a;2021-01-01;5;;Ay
u1;b;1609459300.7;3;fine;
"""


def test_generic_csv_mixed_times_and_inline_item_text(tmp_path):
    path = write(tmp_path / "log.csv", GENERIC)
    ds = load_generic_csv(path, user="uid", item="iid", timestamp="when", rating="stars",
                          text="review", item_text="title", delimiter="semicolon")
    t0 = 1609459200  # 2021-01-01 UTC
    assert events(ds) == [("u1", "a", t0), ("u1", "b", t0 + 100), ("u2", "a", t0),
                          ("u2", "b", t0)]
    assert ds.catalog.texts == ["Ay", "Bee"]
    assert math.isnan(ds.rating[0]) and ds.rating[1:].tolist() == [3.0, 5.0, 4.0]
    assert ds.text == [None, "fine", None, "nice"]


def test_generic_csv_items_file_and_ms(tmp_path):
    path = write(tmp_path / "log.csv", "u,i,t\n1,10,1000\n1,9,1000\n2,77,5000\n")
    items = write(tmp_path / "items.csv", "item,name,tags\n9,Nine,x|y\n10,Ten,\n11,,z\n")
    ds = load_generic_csv(path, user="u", item="i", timestamp="t", items_path=items,
                          items_id="item", item_text="name", item_topics="tags",
                          timestamp_unit="ms")
    assert events(ds) == [("1", "9", 1), ("1", "10", 1)]
    assert ds.catalog.item_ids == ["9", "10", "11"]
    assert ds.catalog.texts == ["Nine", "Ten", "11"]
    assert ds.catalog.topics == [("x", "y"), (), ("z",)]
    assert ds.skipped.counts == {"interactions with items not in items.csv": 1}
    assert ds.user_ids == ["1"]  # user 2 lost its only event


def test_generic_csv_errors(tmp_path):
    path = write(tmp_path / "log.csv", "u,i,t\n1,10,1000\n1,9,last tuesday\n")
    with pytest.raises(DataError) as exc:
        load_generic_csv(path, user="u", item="i", timestamp="t")
    assert_error(exc, "log.csv", 3, "t")
    with pytest.raises(DataError) as exc:
        load_generic_csv(path, user="u", item="item", timestamp="t")
    assert_error(exc, "log.csv", 1, "item")
    with pytest.raises(ConfigError, match="distinct"):
        load_generic_csv(path, user="u", item="u", timestamp="t")
    with pytest.raises(ConfigError, match="unknown text encoding"):
        load_generic_csv(path, user="u", item="i", timestamp="t", encoding="klingon")
    with pytest.raises(ConfigError, match="item_text"):
        load_generic_csv(path, user="u", item="i", timestamp="t", item_text="i")


def test_parse_mapping():
    assert parse_mapping(["user=uid,item=iid", "timestamp=ts,delimiter=tab"]) == {
        "user": "uid", "item": "iid", "timestamp": "ts", "delimiter": "tab"}
    with pytest.raises(ConfigError, match="unknown key 'colour'"):
        parse_mapping("user=u,colour=blue")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_mapping("user")


# ---- dispatcher -------------------------------------------------------------------------


def test_load_dataset_dispatch(tmp_path):
    ml = movielens_dir(tmp_path)
    assert len(load_dataset(ml)) == 5
    assert len(load_dataset(ml / "ratings.csv")) == 5
    assert load_dataset(ml100k_dir(tmp_path) / "u.data").name == "ml-100k"
    assert len(load_dataset(write(tmp_path / "r.jsonl", jsonl(REVIEWS)))) == 3
    generic = write(tmp_path / "log.csv", "u,i,t\n1,10,1000\n")
    assert len(load_dataset(generic, user="u", item="i", timestamp="t")) == 1
    with pytest.raises(ConfigError, match="column mapping"):
        load_dataset(generic)
    with pytest.raises(ConfigError, match="unknown option"):
        load_dataset(ml, user="u")
    with pytest.raises(ConfigError, match="accepted datasets"):
        load_dataset(write(tmp_path / "x.parquet", b""))
    with pytest.raises(ConfigError, match="no such file"):
        load_dataset(tmp_path / "missing")


def test_load_dataset_synthetic():
    pytest.importorskip("fedinterest.simulations.data.synthetic", reason="generator not written yet")
    ds = load_dataset("synthetic:n_users=20,n_items=50,events_per_user=8,seed=3")
    assert ds.n_users == 20 and len(ds.catalog) == 50


def test_default_movielens_path_points_beside_the_checkout():
    found = default_movielens_path()
    if found is not None:
        assert (found / "ratings.csv").is_file() and found.name == "ml-latest-small"


REAL = default_movielens_path()


@pytest.mark.skipif(REAL is None, reason="../shared/data/ml-latest-small is not present")
def test_real_ml_latest_small_numbers():
    ds = load_movielens_csv(REAL)
    s = ds.stats()
    assert (s["users"], s["items"], s["events"], s["texts"]) == (610, 9742, 100836, 3683)
    assert len(ds.notes) == 207 and ds.skipped.total == 0
    ds.validate()


# ---- fuzzing: any bytes either load or raise DataError ----------------------------------

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
cell = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=6)
digits = st.integers(-3, 20).map(str)


def _loads_or_data_error(fn) -> None:
    try:
        fn()
    except DataError:
        pass


@FUZZ
@given(rows=st.lists(st.lists(st.one_of(digits, cell), min_size=3, max_size=5), max_size=8))
def test_fuzz_movielens_rows(tmp_path, rows):
    text = "userId,movieId,rating,timestamp\n" + "\n".join(",".join(r) for r in rows)
    d = movielens_dir(tmp_path, ratings=text)
    _loads_or_data_error(lambda: load_movielens_csv(d))


@FUZZ
@given(ratings=st.binary(max_size=120), movies=st.binary(max_size=120))
def test_fuzz_csv_loaders_random_bytes(tmp_path, ratings, movies):
    d = movielens_dir(tmp_path)
    write(d / "ratings.csv", b"userId,movieId,rating,timestamp\n" + ratings)
    write(d / "movies.csv", movies)
    _loads_or_data_error(lambda: load_movielens_csv(d))
    write(d / "u.data", ratings)
    write(d / "u.item", movies)
    _loads_or_data_error(lambda: load_ml100k(d))
    write(d / "ratings.dat", ratings.replace(b",", b"::"))
    write(d / "movies.dat", movies)
    _loads_or_data_error(lambda: load_ml1m(d))
    generic = write(tmp_path / "g.csv", b"u,i,t,r\n" + ratings)
    _loads_or_data_error(
        lambda: load_generic_csv(generic, user="u", item="i", timestamp="t", rating="r"))


@FUZZ
@given(rows=st.lists(st.tuples(cell, cell, st.one_of(digits, cell, st.just("2020-02-30"))),
                     max_size=8))
def test_fuzz_generic_rows(tmp_path, rows):
    text = "u,i,t\n" + "\n".join(",".join(r) for r in rows)
    path = write(tmp_path / "g.csv", text)

    def load():
        ds = load_generic_csv(path, user="u", item="i", timestamp="t")
        assert np.all(np.diff(ds.user) >= 0)

    _loads_or_data_error(load)


json_value = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                       cell, st.lists(cell, max_size=2))


@FUZZ
@given(
    reviews=st.lists(st.dictionaries(
        st.sampled_from(["reviewerID", "asin", "unixReviewTime", "overall", "summary",
                         "reviewText"]), json_value), max_size=5),
    meta=st.binary(max_size=80),
)
def test_fuzz_amazon(tmp_path, reviews, meta):
    path = write(tmp_path / "r.jsonl", jsonl(reviews))
    meta_path = write(tmp_path / "meta.json", meta)
    _loads_or_data_error(lambda: load_amazon(path))
    _loads_or_data_error(lambda: load_amazon(path, meta=meta_path))
