"""`fedinterest data stats` on small files written here."""

from __future__ import annotations

import json

from fedinterest.simulations.cli import main

RATINGS = "userId,movieId,rating,timestamp\n1,1,4.0,86400\n1,2,3.0,86400\n2,2,5.0,172800\n3,7,1,5\n"
MOVIES = "movieId,title,genres\n1,One (1990),Drama\n2,Two (1991),Comedy|Drama\n"
TAGS = "userId,movieId,tag,timestamp\n1,2,good,86500\n2,1,unrated,172900\n"


def movielens(tmp_path):
    for name, text in (("ratings.csv", RATINGS), ("movies.csv", MOVIES), ("tags.csv", TAGS)):
        (tmp_path / name).write_text(text)
    return str(tmp_path)


def test_stats_text(tmp_path, capsys):
    assert main(["data", "stats", "--data", movielens(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ": 2 users, 2 items, 3 events, 2 texts" in out.splitlines()[0]
    assert "1970-01-02 .. 1970-01-03 (UTC)" in out
    # user 1's two events share a timestamp; user 2 has no consecutive pair
    assert "tie share    1.000" in out
    assert "1 ratings of movies not in movies.csv (e.g. 7)" in out
    assert "1 notes without an event" in out


def test_stats_json(tmp_path, capsys):
    assert main(["data", "stats", "--data", movielens(tmp_path), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["users"], s["items"], s["events"], s["texts"], s["notes"]) == (2, 2, 3, 2, 1)
    assert s["events_with_text"] == 1 and s["ratings"] == 3
    assert s["skip_counts"] == {"ratings of movies not in movies.csv": 1}
    assert s["date_start"] == "1970-01-02"


def test_stats_generic_csv_with_map(tmp_path, capsys):
    path = tmp_path / "log.tsv.csv"
    path.write_text("who\twhat\twhen\na\tx\t2020-05-01T12:00:00+02:00\nb\tx\t1588327200\n")
    argv = ["data", "stats", "--data", str(path), "--map", "user=who,item=what", "--map",
            "timestamp=when,delimiter=tab", "--json"]
    assert main(argv) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["users"], s["items"], s["events"]) == (2, 1, 2)
    assert s["time_start"] == s["time_end"] == 1588327200
    assert "their text is the item id" in s["load_info"][0]


def test_stats_errors_exit_2_without_traceback(tmp_path, capsys):
    (tmp_path / "log.csv").write_text("u,i,t\n1,2,3\n")
    assert main(["data", "stats", "--data", str(tmp_path / "log.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--map user=" in err and "Traceback" not in err
    bad = tmp_path / "ml"
    bad.mkdir()
    (bad / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,x,5\n")
    (bad / "movies.csv").write_text(MOVIES)
    assert main(["data", "stats", "--data", str(bad)]) == 2
    assert "ratings.csv, line 2, field 'rating'" in capsys.readouterr().err


def test_the_old_positional_dataset_still_works_with_a_note(tmp_path, capsys):
    assert main(["data", "stats", movielens(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["users"] > 0 and "deprecated, use --data" in err
    assert main(["data", "stats"]) == 2
    assert "--data is required" in capsys.readouterr().err
