"""Every `fedinterest` command follows one vocabulary: walks every command's and
subcommand's options (what `--help` shows) and checks the words and that each has help."""

from __future__ import annotations

import argparse

import pytest
from fedinterest.shared.config import CHOICES, FIELD_HELP, RunConfig
from fedinterest.simulations.cli import build_parser, main
from fedinterest.simulations.cli.run_flags import flag

# old spellings: accepted (hidden) but never shown
HIDDEN = {"--dataset", "--out-dir"}
# where `--model` may appear it means the recommender, never the text encoder
MODEL_IS_RECOMMENDER = {"fedinterest simulate", "fedinterest train-central"}


def _parsers(parser: argparse.ArgumentParser, prog: str = "fedinterest"):
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def _visible_options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and action.help != argparse.SUPPRESS:
            yield action


PARSERS = list(_parsers(build_parser()))


def test_the_walk_reaches_every_command():
    names = {p for p, _ in PARSERS}
    for cmd in ("data stats", "embed", "simulate", "prepare", "train-central", "report",
                "audit", "experiment privacy-utility", "bench encoder", "bench all",
                "client recommend", "client install-model"):
        assert f"fedinterest {cmd}" in names, cmd


@pytest.mark.parametrize(("prog", "parser"), PARSERS, ids=[p for p, _ in PARSERS])
def test_options_follow_the_vocabulary_and_have_help(prog, parser):
    for action in _visible_options(parser):
        assert action.help, f"{prog} {action.option_strings}: no help text"
        for opt in action.option_strings:
            assert opt not in HIDDEN, f"{prog}: {opt} is the old spelling"
            if opt == "--model":
                assert prog in MODEL_IS_RECOMMENDER, f"{prog}: --model must be --encoder"
        if action.dest in ("data", "out", "encoder"):
            assert f"--{action.dest}" in action.option_strings, (prog, action.option_strings)
    for action in parser._actions:  # the data set and output are never positional
        if not action.option_strings and action.dest in ("dataset", "data", "out", "out_dir"):
            assert action.help == argparse.SUPPRESS, f"{prog}: positional {action.dest}"
    parser.format_help()  # renders


def test_simulate_has_one_flag_per_run_setting_with_help_and_choices():
    parser = dict(PARSERS)["fedinterest simulate"]
    by_dest = {a.dest: a for a in _visible_options(parser)}
    for section in FIELD_HELP.values():
        for name in section:
            action = by_dest[name]
            assert flag(name) in action.option_strings
            assert "(default: " in action.help
            if name in CHOICES:
                assert tuple(action.choices) == CHOICES[name]
    defaults = RunConfig()
    assert set(FIELD_HELP["data and output"]) <= set(defaults.to_dict())
    assert sum(len(s) for s in FIELD_HELP.values()) == len(defaults.to_dict())


def test_old_spellings_still_parse_with_a_note(capsys):
    args = build_parser().parse_args(["simulate", "--dataset", "synthetic:n_users=5",
                                      "--out-dir", "x"])
    assert args.dataset == "synthetic:n_users=5" and args.out_dir == "x"
    assert "--dataset is deprecated, use --data" in capsys.readouterr().err
    args = build_parser().parse_args(["embed", "--data", "d", "--model", "enc"])
    assert args.encoder == "enc" and "--model is deprecated, use --encoder" in \
        capsys.readouterr().err


def test_set_takes_both_spellings_and_overrides_a_flag(monkeypatch):
    seen = {}

    def fake_run(cfg, ds, **kw):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("fedinterest.simulations.simulate.run", fake_run)
    for spelling in ("local-epochs", "local_epochs"):
        with pytest.raises(SystemExit):
            main(["simulate", "--data", "synthetic:n_users=5", "--local-epochs", "3",
                  "--set", f"{spelling}=2", "--quiet"])
        assert seen["cfg"].local_epochs == 2
    assert main(["simulate", "--set", "local-epochs=2", "--set", "local_epochs=3"]) == 2


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("fedinterest ")


def test_a_bad_value_names_the_flag_s_setting(capsys):
    assert main(["simulate", "--rounds", "0", "--quiet"]) == 2
    assert "key 'rounds' expects an integer in [1," in capsys.readouterr().err
