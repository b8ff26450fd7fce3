"""MovieLens loaders: the CSV releases (ml-latest-small, ml-latest, ml-20m, ml-25m, ml-32m),
ml-100k (u.data / u.item) and ml-1m / ml-10m (ratings.dat / movies.dat / tags.dat).

Item text is "title. Genres: a, b, c" and the genres are the catalog topics ("(no genres
listed)" and ml-100k's "unknown" give no topic). Tags are the users' private text: each tag is
attached to the same user's rating of that movie (several tags joined with "; " in time order);
a tag on a movie the user never rated is kept as a `Note` on the device, not turned into an
event. `n_text_pieces` counts every kept tag row.

What is fatal and what is skipped:
- fatal (DataError naming file, line, field): a missing file or column, an empty file, bytes
  that do not decode, a row with the wrong number of fields, a value that does not parse (id,
  rating, timestamp, genre flag), a duplicate movie id. These mean the file is not what we
  think it is, and guessing would corrupt every number computed from it.
- skipped and reported in `Dataset.skipped`: blank lines, ratings of movies missing from the
  movie list, tags by users with no rating or on unknown movies, empty tags. The files are
  intact; only those rows cannot be placed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fedinterest.shared.errors import DataError
from fedinterest.shared.schema import Dataset, Note, SkipReport
from fedinterest.simulations.data.common import (
    BadValue,
    Events,
    IdCodes,
    RowFile,
    UniqueIds,
    attach_texts,
    read_table,
    resolve_events,
    to_rating,
    to_raw,
    to_unix_seconds,
)

NO_GENRE = {"(no genres listed)", "unknown"}
# ml-100k's genre order, used when u.genre is absent (it is the README's list).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)


def item_text(title: str, genres: Sequence[str]) -> str:
    """What the text encoder reads for a movie: its title and genres."""
    title = title.strip()
    if not genres:
        return title
    return f"{title}. Genres: {', '.join(genres)}" if title else f"Genres: {', '.join(genres)}"


def split_genres(field: str) -> tuple[str, ...]:
    return tuple(g.strip() for g in field.split("|") if g.strip() and g.strip() not in NO_GENRE)


def _read_ratings(
    src: RowFile, fields: Sequence[str], skipped: SkipReport, header: bool = True
) -> tuple[IdCodes, IdCodes, dict]:
    """(user codes, item codes, values) of a ratings file; `fields` names its user, item,
    rating and timestamp columns (the whole row when the file has no header)."""
    users, items = IdCodes(), IdCodes()
    u, i, r, t = fields
    convs = {u: users, i: items, r: to_rating, t: to_unix_seconds}
    cols = read_table(src, convs, skipped, columns=None if header else fields)
    return users, items, {"user": cols[u], "item": cols[i], "rating": cols[r], "ts": cols[t]}


def _read_tags(
    src: RowFile, fields: Sequence[str], skipped: SkipReport, header: bool = True
) -> dict:
    """Raw tag rows; `fields` names the user, movie, tag and timestamp columns."""
    u, m, tag, t = fields
    convs = {u: to_raw, m: to_raw, tag: to_raw, t: to_unix_seconds}
    cols = read_table(src, convs, skipped, columns=None if header else fields)
    return {"user": cols[u], "item": cols[m], "tag": cols[tag], "ts": np.asarray(cols[t])}


def _attach_tags(
    events: Events, tags: dict, tags_file: str, movies_file: str, skipped: SkipReport
) -> tuple[int, list[Note]]:
    user_index = {u: i for i, u in enumerate(events.user_ids)}
    item_index = events.catalog.index
    pieces = []
    for u, m, text, t in zip(tags["user"], tags["item"], tags["tag"], tags["ts"].tolist()):
        u, m, text = u.strip(), m.strip(), text.strip()
        if not text:
            skipped.add(f"empty tags in {tags_file}", f"user {u}, movie {m}")
        elif u not in user_index:
            skipped.add(f"tags in {tags_file} by users with no rating", f"user {u}")
        elif m not in item_index:
            skipped.add(f"tags in {tags_file} on movies not in {movies_file}", f"movie {m}")
        else:
            pieces.append((user_index[u], item_index[m], t, text))
    return attach_texts(events, pieces)


def _finish(
    name: str,
    ratings_path: Path,
    catalog_rows: dict[str, tuple[str, tuple[str, ...]]],
    movies_file: str,
    rated: tuple[IdCodes, IdCodes, dict],
    tags: dict | None,
    tags_path: Path | None,
    skipped: SkipReport,
) -> Dataset:
    users, items, cols = rated
    events = resolve_events(
        catalog_rows, users, cols["user"], items, cols["item"], cols["ts"], cols["rating"],
        None, skipped, f"ratings of movies not in {movies_file}",
    )
    info: list[str] = []
    notes: list[Note] = []
    n_pieces = 0
    if tags is not None and tags_path is not None:
        attached, notes = _attach_tags(events, tags, tags_path.name, movies_file, skipped)
        n_pieces = attached + len(notes)
        with_text = sum(t is not None for t in events.text or [])
        info.append(f"{attached:,} tags attached to {with_text:,} rating events")
        info.append(
            f"{len(notes):,} tags on movies the user never rated kept as notes "
            "(private text on the device, not events)"
        )
    return events.to_dataset(
        name, ratings_path, skipped, notes=notes, n_text_pieces=n_pieces,
        extras={"load_info": info},
    )


def load_movielens_csv(folder: str | Path, name: str | None = None) -> Dataset:
    """A MovieLens CSV release: ratings.csv, movies.csv and, if present, tags.csv (UTF-8).
    Extra columns are ignored; the named ones must be there."""
    folder = Path(folder)
    skipped = SkipReport()

    movies = folder / "movies.csv"
    convs = {"movieId": UniqueIds(), "title": to_raw, "genres": to_raw}
    cols = read_table(RowFile(movies), convs, skipped)
    catalog_rows = {}
    for mid, title, genres in zip(cols["movieId"], cols["title"], cols["genres"]):
        topics = split_genres(genres)
        catalog_rows[mid] = (item_text(title, topics), topics)

    ratings = folder / "ratings.csv"
    rated = _read_ratings(RowFile(ratings), ["userId", "movieId", "rating", "timestamp"], skipped)

    tags_path = folder / "tags.csv"
    tags = None
    if tags_path.exists():
        tags = _read_tags(RowFile(tags_path), ["userId", "movieId", "tag", "timestamp"], skipped)
    return _finish(
        name or folder.resolve().name, ratings, catalog_rows, "movies.csv", rated, tags,
        tags_path, skipped,
    )


def _genre_flags(values: Sequence[str]) -> np.ndarray:
    arr = np.char.strip(np.asarray(values, dtype=np.str_))
    bad = np.flatnonzero((arr != "0") & (arr != "1"))
    if len(bad):
        raise BadValue(int(bad[0]), "a genre flag 0 or 1")
    return arr == "1"


def _genre_index(values: Sequence[str]) -> list[int]:
    for i, v in enumerate(values):
        if not v.strip().isdecimal():
            raise BadValue(i, "a genre index 0, 1, 2, ...")
    return [int(v) for v in values]


def _ml100k_genres(folder: Path, encoding: str, skipped: SkipReport) -> tuple[str, ...]:
    """Genre names in flag order from u.genre ("name|index" lines), else the README's list."""
    path = folder / "u.genre"
    if not path.exists():
        return ML100K_GENRES
    src = RowFile(path, "|", encoding, quoted=False)
    cols = read_table(src, {"genre": to_raw, "index": _genre_index}, skipped, ["genre", "index"])
    names = dict(zip(cols["index"], (g.strip() for g in cols["genre"])))
    if sorted(names) != list(range(len(cols["index"]))):
        raise DataError(path, None, "index", "expected the indices 0..n-1, each once")
    return tuple(names[i] for i in range(len(names)))


def load_ml100k(folder: str | Path, name: str | None = None, encoding: str = "latin-1") -> Dataset:
    """ml-100k: u.data (tab-separated user, item, rating, timestamp) and u.item ('|'-separated
    id, title, release date, video release date, IMDb URL and one 0/1 flag per genre)."""
    folder = Path(folder)
    skipped = SkipReport()
    genres = _ml100k_genres(folder, encoding, skipped)

    movies = folder / "u.item"
    columns = ["movie id", "movie title", "release date", "video release date", "IMDb URL",
               *genres]
    convs = {"movie id": UniqueIds(), "movie title": to_raw}
    convs.update({g: _genre_flags for g in genres})
    cols = read_table(RowFile(movies, "|", encoding, quoted=False), convs, skipped, columns)
    if not cols["movie id"]:
        raise DataError(movies, None, None, "empty file: expected one movie per line")
    flags = np.stack([np.asarray(cols[g], bool) for g in genres], axis=1)
    catalog_rows = {}
    for mid, title, row in zip(cols["movie id"], cols["movie title"], flags):
        topics = tuple(g for g, on in zip(genres, row) if on and g not in NO_GENRE)
        catalog_rows[mid] = (item_text(title, topics), topics)

    ratings = folder / "u.data"
    fields = ["user id", "item id", "rating", "timestamp"]
    rated = _read_ratings(RowFile(ratings, "\t", encoding, quoted=False), fields, skipped, False)
    return _finish(
        name or folder.resolve().name, ratings, catalog_rows, "u.item", rated, None, None, skipped
    )


def load_ml1m(folder: str | Path, name: str | None = None, encoding: str = "latin-1") -> Dataset:
    """ml-1m / ml-10m: ratings.dat (UserID::MovieID::Rating::Timestamp), movies.dat
    (MovieID::Title::Genres with '|' between genres) and, for ml-10m, tags.dat
    (UserID::MovieID::Tag::Timestamp)."""
    folder = Path(folder)
    skipped = SkipReport()

    movies = folder / "movies.dat"
    columns = ["MovieID", "Title", "Genres"]
    convs = {"MovieID": UniqueIds(), "Title": to_raw, "Genres": to_raw}
    cols = read_table(RowFile(movies, "::", encoding, quoted=False), convs, skipped, columns)
    if not cols["MovieID"]:
        raise DataError(movies, None, None, "empty file: expected MovieID::Title::Genres lines")
    catalog_rows = {}
    for mid, title, genre_field in zip(cols["MovieID"], cols["Title"], cols["Genres"]):
        topics = split_genres(genre_field)
        catalog_rows[mid] = (item_text(title, topics), topics)

    ratings = folder / "ratings.dat"
    fields = ["UserID", "MovieID", "Rating", "Timestamp"]
    rated = _read_ratings(RowFile(ratings, "::", encoding, quoted=False), fields, skipped, False)

    tags_path = folder / "tags.dat"
    tags = None
    if tags_path.exists():
        fields = ["UserID", "MovieID", "Tag", "Timestamp"]
        tags = _read_tags(RowFile(tags_path, "::", encoding, quoted=False), fields, skipped, False)
    return _finish(
        name or folder.resolve().name, ratings, catalog_rows, "movies.dat", rated, tags,
        tags_path, skipped,
    )
