"""saetrain.files: output folders are written whole beside out_dir and renamed into place, so
nothing a user made is replaced silently or half-way (issue #21). Fast, no model."""

from __future__ import annotations

import pytest

from saetrain import UserError
from saetrain.files import check_out_dir, read_json, staged_dir


def files_in(folder) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_staged_folder_becomes_out_dir_only_when_its_body_finishes(tmp_path):
    out = tmp_path / "nested" / "results"
    with staged_dir(out, overwrite=False) as staged:
        (staged / "results.json").write_text("{}")
        assert staged.parent == out.parent and not out.exists()  # same filesystem, not there yet
    assert files_in(out) == {"results.json": "{}"}
    assert [p.name for p in out.parent.iterdir()] == ["results"]  # no temporary folder left


def test_a_non_empty_out_dir_is_refused_unless_overwrite_and_then_replaced_whole(tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("old")
    (out / "stale.txt").write_text("from an older run")
    with pytest.raises(UserError, match="eval already exists and is not empty: choose another "):
        check_out_dir(out, overwrite=False)
    with pytest.raises(UserError, match="or pass --overwrite true to replace it"):
        with staged_dir(out, overwrite=False):
            raise AssertionError("the body ran")
    assert files_in(out) == {"results.json": "old", "stale.txt": "from an older run"}
    with staged_dir(out, overwrite=True) as staged:
        (staged / "results.json").write_text("new")
    assert files_in(out) == {"results.json": "new"}  # the old run's files are gone
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]
    check_out_dir(tmp_path / "empty", overwrite=False)  # missing or empty: fine
    (tmp_path / "empty").mkdir()
    with staged_dir(tmp_path / "empty", overwrite=False) as staged:
        (staged / "a").write_text("a")
    assert files_in(tmp_path / "empty") == {"a": "a"}


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_body_leaves_the_old_folder_as_it_was(tmp_path, failure):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text("old")
    with pytest.raises(type(failure)):
        with staged_dir(out, overwrite=True) as staged:
            (staged / "results.json").write_text("half")
            raise failure
    assert files_in(out) == {"results.json": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


def test_results_are_kept_when_something_else_filled_out_dir_meanwhile(tmp_path):
    out = tmp_path / "eval"
    with pytest.raises(UserError, match="filled by something else while this command ran") as e:
        with staged_dir(out, overwrite=False) as staged:
            (staged / "results.json").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert files_in(out) == {"theirs.txt": "theirs"}
    assert files_in(staged) == {"results.json": "mine"} and str(staged) in str(e.value)


def test_overwrite_never_deletes_the_current_folder_or_an_input_inside_out_dir(
    tmp_path, monkeypatch
):
    sae = tmp_path / "run" / "sae"
    sae.mkdir(parents=True)
    (sae / "cfg.json").write_text("{}")
    with pytest.raises(UserError, match=r"--out_dir .*run holds .*sae, which --overwrite true"):
        check_out_dir(tmp_path / "run", overwrite=True, inputs=[str(sae), None, "owner/hub-id"])
    monkeypatch.chdir(sae)
    with pytest.raises(UserError, match="which --overwrite true would delete with the folder"):
        check_out_dir(tmp_path / "run", overwrite=True)
    assert (sae / "cfg.json").is_file()


def test_a_json_file_that_is_missing_or_corrupt_is_one_line_naming_it(tmp_path):
    with pytest.raises(UserError, match=r"features_table .*nope.json does not exist: run it"):
        read_json(tmp_path / "nope.json", "features_table", "run it")
    (tmp_path / "bad.json").write_text('{"methods": ')
    with pytest.raises(UserError, match=r"features_table .*bad.json is not valid JSON \(Exp"):
        read_json(tmp_path / "bad.json", "features_table", "run it")
