"""Several SAEs from one LM forward pass (issue #3): two layers x two SAE sizes train to the
same weights as four separate runs on the same data, each with its own metrics and export."""

from __future__ import annotations

import json

import pytest
import torch
from lmfixtures import error_line, tiny_fit_args
from safetensors.torch import load_file

from saetrain.cli import main


def fit_args(model_dir, data, out_dir, run_name, *extra) -> list[str]:
    run = ["--run_name", run_name, "--trainer.max_steps", "20"]
    # With several layers a token that is an outlier at any layer is dropped at all of them,
    # so the comparison with single-layer runs keeps every token.
    same_data = ["--data.outlier_multiple", "null"]
    return tiny_fit_args(model_dir, data, out_dir, *run, *same_data, *extra)


def test_two_layers_by_two_sizes_in_one_pass_equal_four_separate_runs(
    tiny_model_dir, chat_jsonl, tmp_path
):
    variants = '[{"expansion_factor": 2}, {"expansion_factor": 4, "k": 8}]'
    both = ["--data.layer", "[0, 1]", "--model.sae_variants", variants]
    assert main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, "together", *both)) == 0
    together = tmp_path / "together"
    for layer in (0, 1):
        for factor, k, name in ((2, 4, "64-k4"), (4, 8, "128-k8")):
            alone = f"alone-{layer}-{factor}"
            one = ["--data.layer", str(layer), "--model.expansion_factor", str(factor)]
            one += ["--model.k", str(k)]
            assert main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, alone, *one)) == 0
            want = load_file(tmp_path / alone / "sae.safetensors")
            folder = together / f"layers.{layer}__{name}"
            got = load_file(folder / "sae.safetensors")
            assert want.keys() == got.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), (layer, factor, key)
            cfg = json.loads((folder / "cfg.json").read_text())
            assert cfg["extra"]["layer"] == layer and cfg["extra"]["hookpoint"] == f"layers.{layer}"
            assert cfg["num_latents"] == 32 * factor and cfg["k"] == k
            assert "val_fvu" in cfg["extra"]


def test_each_sae_logs_its_own_metrics(tiny_model_dir, chat_jsonl, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    variants = '[{"k": 4}, {"k": 8}]'
    args = ["--data.layer", "[0, 1]", "--model.sae_variants", variants]
    assert main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, "m", *args)) == 0
    events = EventAccumulator(str(tmp_path / "m"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for hookpoint in ("layers.0", "layers.1"):
        for name in ("128-k4", "128-k8"):
            assert {f"train/{hookpoint}/{name}/fvu", f"val/{hookpoint}/{name}/fvu"} <= tags


@pytest.mark.parametrize(
    "args, words",
    [
        (["--data.layer", "[0, 0]"], "distinct"),
        (["--model.sae_variants", '[{"kk": 3}]'], "cannot set: choose from"),
        (["--model.sae_variants", "[]"], "is empty"),
    ],
    ids=["repeated-layer", "unknown-field", "no-variant"],
)
def test_bad_multi_sae_settings_are_refused_in_one_line(
    tiny_model_dir, chat_jsonl, tmp_path, capsys, args, words
):
    assert main(fit_args(tiny_model_dir, chat_jsonl, tmp_path, "bad", *args)) == 2
    assert words in error_line(capsys)
