"""``python -m saetrain evaluate`` (issue #22) end to end on the tiny Phi-3 and chat corpus: the
files it writes, the held-out documents it picks, several SAEs side by side, the SAELens round
trip, and one clear line for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from lmfixtures import error_line

from saetrain import SAE, SAEConfig, load_sae
from saetrain.cli import main
from saetrain.evals.quality import DEFINITIONS, SCOPES
from saetrain.interop import export_sae

FIGURES = set(DEFINITIONS)


@pytest.fixture(scope="module")
def held_out_sae(sae_dir, tmp_path_factory):
    """The tiny SAE with the number of documents it 'trained on' recorded, as fit records it."""
    sae = load_sae(sae_dir)
    sae.cfg.extra["documents_read"] = 40
    return sae.save(tmp_path_factory.mktemp("held") / "tiny", sae.cfg.extra)


def evaluate(*args: str) -> int:
    return main(["evaluate", "--docs", "4", "--ctx_len", "32", *args])


def test_evaluate_writes_every_figure_per_scope_on_documents_past_training(
    held_out_sae, tmp_path, capsys
):
    out = tmp_path / "ev"
    assert evaluate("--sae", str(held_out_sae), "--out_dir", str(out)) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["layer"] == 1 and report["data"]["first_document"] == 40
    assert report["data"]["tokens"] == 4 * 32 and "past the 40 documents" in report["data"]["why"]
    assert FIGURES <= set(report["definitions"]) and "sae_lens/evals.py" in str(report)
    (entry,) = report["saes"]
    for scope in SCOPES:
        assert FIGURES <= set(entry[scope])
    assert entry["all_tokens"]["tokens"] == 4 * 32
    # The corpus renders chat turns: their template tokens and position 0 are left out.
    assert entry["trained_tokens"]["tokens"] < entry["all_tokens"]["tokens"]
    assert entry["trained_tokens"]["l0"] == pytest.approx(4.0)
    assert "position 0" in report["exclusions"]
    summary = (out / "summary.md").read_text()
    assert "loss_recovered_zero" in summary and "trained tokens" in summary
    assert summary in capsys.readouterr().out
    assert (out / "config.yaml").is_file()


def test_other_documents_give_other_tokens_and_the_same_documents_the_same_figures(
    held_out_sae, tmp_path
):
    def figures(skip: str, name: str) -> dict:
        out = tmp_path / name
        assert (
            evaluate("--sae", str(held_out_sae), "--skip_documents", skip, "--out_dir", str(out))
            == 0
        )
        return json.loads((out / "eval.json").read_text())["saes"][0]["all_tokens"]

    a, b, c = figures("40", "a"), figures("40", "b"), figures("0", "c")
    assert a == b and a["ce_clean"] != c["ce_clean"]


def test_an_sae_exported_to_saelens_and_back_gets_the_same_figures(held_out_sae, tmp_path):
    exported = export_sae(load_sae(held_out_sae), tmp_path / "sl", "saelens")
    out = tmp_path / "ev"
    assert evaluate("--sae", f"[{held_out_sae}, {exported}]", "--out_dir", str(out)) == 0
    ours, theirs = json.loads((out / "eval.json").read_text())["saes"]
    assert theirs["path"] == str(exported)
    for scope in SCOPES:
        for key, value in ours[scope].items():
            assert theirs[scope][key] == pytest.approx(value, abs=1e-4), (scope, key)


def test_evaluate_takes_another_corpus_from_its_start(held_out_sae, chat_jsonl, tmp_path):
    out = tmp_path / "ev"
    args = ["--sae", str(held_out_sae), "--data.path", str(chat_jsonl), "--out_dir", str(out)]
    assert evaluate(*args) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["first_document"] == 0 and report["data"]["source"] == str(chat_jsonl)


def test_an_sae_that_does_not_say_what_it_trained_on_needs_skip_documents(
    sae_dir, tmp_path, capsys
):
    assert evaluate("--sae", str(sae_dir), "--out_dir", str(tmp_path / "ev")) == 2
    line = error_line(capsys)
    assert "documents_read" in line and "--skip_documents" in line
    assert not (tmp_path / "ev").exists()


@pytest.fixture
def wide_sae(tmp_path, sae_dir):
    cfg = json.loads((sae_dir / "cfg.json").read_text())
    return SAE(SAEConfig(d_in=16, num_latents=32, k=4)).save(tmp_path / "wide", cfg["extra"])


@pytest.mark.parametrize(
    "args, says",
    [
        (["--sae", "/no/such/sae"], "does not exist"),
        (["--sae", "{held}", "--layer", "7"], "layer 7 does not exist"),
        (["--sae", "{wide}"], "d_in=16"),
        (["--sae", "{held}", "--docs", "0"], "docs must be >= 1"),
        (["--sae", "{held}", "--docs", "100000"], "fewer than docs=100000"),
        (["--sae", "{held}", "--skip_documents", "100000"], "gives 0 sequences"),
        (["--sae", "{held}", "--data.path", "{empty}"], "holds no text"),
        (["--sae", "[{held}, {wide}]"], "different widths"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_with_nothing_written(
    args, says, held_out_sae, wide_sae, tmp_path, capsys
):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    paths = {"held": held_out_sae, "wide": wide_sae, "empty": empty}
    args = [a.format(**paths) for a in args]
    out = tmp_path / "ev"
    assert evaluate(*args, "--out_dir", str(out)) == 2
    assert says in error_line(capsys)
    assert not out.exists()


def test_evaluate_refuses_a_full_out_dir_before_loading_anything(held_out_sae, tmp_path, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval.json").write_text("old")
    assert evaluate("--sae", str(held_out_sae), "--out_dir", str(out)) == 2
    assert "--overwrite true" in error_line(capsys)
    assert (out / "eval.json").read_text() == "old"
    assert evaluate("--sae", str(held_out_sae), "--out_dir", str(out), "--overwrite", "true") == 0
    assert json.loads((out / "eval.json").read_text())["saes"]


def test_a_batchtopk_sae_is_evaluated_as_a_jumprelu(held_out_sae, tmp_path):
    torch.manual_seed(0)
    base = load_sae(held_out_sae)
    cfg = SAEConfig(d_in=32, num_latents=64, k=4, activation="batchtopk", extra=base.cfg.extra)
    sae = SAE(cfg)
    sae.threshold.fill_(0.0)  # every positive pre-activation fires: L0 well above k
    path = sae.save(tmp_path / "btk", cfg.extra)
    out = tmp_path / "ev"
    assert evaluate("--sae", str(path), "--out_dir", str(out)) == 0
    entry = json.loads((out / "eval.json").read_text())["saes"][0]
    assert entry["activation"] == "batchtopk" and entry["trained_tokens"]["l0"] > 8
    shutil.rmtree(out)
