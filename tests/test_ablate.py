"""The seed ablation: row maps are valid seed scores, and the command writes every row."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rsepm_jax.configs import demo
from rsepm_jax import ablate
from rsepm_jax.refine import recurseed


@pytest.mark.parametrize("row", ablate.CAM_ROWS + ("RS",))
def test_row_scores_are_in_unit_range_and_zero_for_absent_classes(row):
  rng = np.random.default_rng(0)
  batch, size, classes = 2, 32, 4
  outputs = {
      "cams": jnp.asarray(rng.normal(size=(batch, 4, 4, classes)), jnp.float32),
      "seg_logits": jnp.asarray(rng.normal(size=(batch, 8, 8, classes + 1)), jnp.float32),
      "features": {"C4": jnp.asarray(rng.normal(size=(batch, 4, 4, 16)), jnp.float32),
                   "C5": jnp.asarray(rng.normal(size=(batch, 4, 4, 32)), jnp.float32)},
  }
  images = jnp.asarray(rng.normal(size=(batch, size, size, 3)), jnp.float32)
  labels = jnp.asarray([[1, 0, 1, 0], [0, 0, 0, 1]], jnp.float32)
  settings = recurseed.Settings(pamr_dilations=(1, 2), pamr_iter=3)
  scores = np.asarray(jax.jit(lambda o, i, l: ablate.row_scores(row, o, i, l, settings))(
      outputs, images, labels))
  assert scores.shape[0] == batch and scores.shape[-1] == classes
  assert np.all(scores >= 0) and np.all(scores <= 1 + 1e-5)
  assert np.all(scores[np.broadcast_to(np.asarray(labels)[:, None, None, :] == 0, scores.shape)] == 0)
  assert np.all(scores.max(axis=(1, 2))[np.asarray(labels) > 0] > 0.5)  # each tag has a peak


def test_unknown_row_is_an_error():
  with pytest.raises(ValueError, match=r"Unknown ablation row 'CAM\+CRF'"):
    ablate.row_scores("CAM+CRF", {"cams": jnp.zeros((1, 2, 2, 1)),
                                  "seg_logits": jnp.zeros((1, 4, 4, 2)), "features": {}},
                      jnp.zeros((1, 8, 8, 3)), jnp.ones((1, 1)), recurseed.Settings())


def test_plan_runs_share_prefixes_and_flip_one_knob_per_variant():
  config = demo.get_config()
  config.train.num_epochs, config.loss.rs_start_epoch = 6, 2
  config.loss.decoder_source_epoch, config.loss.mix_start_epoch = 3, 4
  runs = {run.name: run for run in ablate.plan_runs(
      config, ("epm",), ("filter_input", "decoder_source_dropout", "bn_stats"))}
  assert list(runs) == ["cam", "rs_cam", "rs_decoder", "rs_epm", "variant_filter_input",
                        "variant_decoder_source_dropout", "variant_bn_stats"]
  # (parent, fork epoch) of every run: each continues the run it equals up to that epoch.
  assert {name: (run.parent, run.fork_epoch) for name, run in runs.items()} == {
      "cam": (None, 0), "rs_cam": ("cam", 2), "rs_decoder": ("rs_cam", 3),
      "rs_epm": ("rs_decoder", 4), "variant_filter_input": ("cam", 2),
      "variant_decoder_source_dropout": ("rs_cam", 3), "variant_bn_stats": ("rs_decoder", 4)}
  assert runs["cam"].overrides == {"mix.kind": "none", "loss.rs_start_epoch": 6}
  assert runs["rs_cam"].overrides["loss.decoder_source_epoch"] == 6  # never switches
  assert runs["rs_epm"].overrides == {"mix.kind": "epm", "loss.decoder_source_epoch": 3}
  assert runs["variant_filter_input"].overrides == {
      "mix.kind": "none", "loss.decoder_source_epoch": 3, "recurseed.filter_input": "source"}
  assert runs["variant_bn_stats"].rows == {"RS+EPM [train.bn_stats=clean]": "RS"}
  weight = {r.name: r for r in ablate.plan_runs(config, (), ("decoder_source_weight",))}
  assert weight["variant_decoder_source_weight"].overrides == {
      "mix.kind": "none", "loss.decoder_source_epoch": 3, "loss.decoder_source_weight": 0.5}
  assert (weight["variant_decoder_source_weight"].parent,
          weight["variant_decoder_source_weight"].fork_epoch) == ("rs_cam", 3)
  assert runs["variant_decoder_source_dropout"].rows == {
      "RS (decoder source) [recurseed.decoder_source_dropout=True]": "RS"}
  # A config that never switches to the decoder: the recipe is the CAM-source run.
  config.loss.decoder_source_epoch = 6
  runs = {run.name: run for run in ablate.plan_runs(config, ("cutmix",), ())}
  assert (runs["rs_cutmix"].parent, runs["rs_decoder"].fork_epoch) == ("rs_cam", 4)  # R + 2
  with pytest.raises(ValueError, match="Unknown variants"):
    ablate.plan_runs(config, (), ("dropout",))
  with pytest.raises(ValueError, match="Unknown mixing kinds"):
    ablate.plan_runs(config, ("mixup",), ())


def test_summary_mean_and_sample_std():
  per_seed = {0: {"RS": {"miou": 0.4, "fp": 0.2, "fn": 0.4, "threshold": 0.3}},
              1: {"RS": {"miou": 0.6, "fp": 0.1, "fn": 0.3, "threshold": 0.2}},
              2: {"RS": {"miou": 0.5, "fp": 0.3, "fn": 0.2, "threshold": 0.3}}}
  summary = ablate.summarize(per_seed, 800)["RS"]
  assert summary["miou"] == pytest.approx(0.5) and summary["miou_std"] == pytest.approx(0.1)
  assert summary["fp_std"] == pytest.approx(0.1) and summary["fn"] == pytest.approx(0.3)
  assert summary["steps"] == 800 and summary["seeds"]["1"]["miou"] == 0.6
  assert "50.0 +- 10.0" in ablate.format_ablation({"RS": summary})


def test_ablation_trains_forks_and_writes_every_row(tmp_path):
  config = demo.get_config("smoke")
  # One seed and no mixing run keep the suite fast; `summarize` and the mixing runs' parents are
  # tested above.
  results = ablate.run_ablation(config, str(tmp_path), mix_kinds=(), seeds=(1,))
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert saved == json.loads(json.dumps(results))
  assert list(saved) == list(ablate.CAM_ROWS) + ["RS (CAM source)", "RS (decoder source)"]
  steps_per_epoch = config.data.synthetic.num_train // config.train.global_batch_size
  total = steps_per_epoch * config.train.num_epochs
  for row, scores in saved.items():
    assert scores["steps"] == total and set(scores["seeds"]) == {"1"} and scores["miou_std"] == 0
    for seed_scores in scores["seeds"].values():
      assert 0 <= seed_scores["miou"] <= 1 and 0 <= seed_scores["fp"] <= 1
    values = [v["miou"] for v in scores["seeds"].values()]
    assert scores["miou"] == pytest.approx(np.mean(values))
  runs = tmp_path / "seed_1"
  # Every run ends at the same step; forked runs start from their parent's checkpoint.
  for name, first in (("cam", steps_per_epoch), ("rs_cam", config.loss.rs_start_epoch * steps_per_epoch),
                      ("rs_decoder", config.loss.rs_start_epoch * steps_per_epoch)):
    kept = sorted(int(p.name) for p in (runs / name / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[0] == first and kept[-1] == total, (name, kept)
  # The CAM rows come from a run trained with the classification loss alone.
  cam_metrics = [json.loads(line) for line in (tmp_path / "seed_1" / "cam" / "metrics.jsonl").read_text().splitlines()]
  assert all(m.get("loss_seg", 0.0) == 0.0 for m in cam_metrics if "loss" in m)
