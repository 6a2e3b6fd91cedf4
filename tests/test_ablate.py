"""The seed ablation: row maps are valid seed scores, and the command writes every row."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
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


def test_ablation_trains_forks_and_writes_every_row(tmp_path):
  config = demo.get_config("smoke")
  results = ablate.run_ablation(config, str(tmp_path), mix_kinds=("epm",))
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert list(saved) == list(ablate.CAM_ROWS) + ["RS", "RS+EPM"]
  for row, scores in saved.items():
    assert scores == pytest.approx(results[row])
  for scores in saved.values():
    assert 0 <= scores["miou"] <= 1 and 0 <= scores["fp"] <= 1 and 0 <= scores["fn"] <= 1
  # The EPM run continued the RecurSeed run from its mix_start checkpoint, not from scratch.
  steps_per_epoch = config.data.synthetic.num_train // config.train.global_batch_size
  forked = sorted(int(p.name) for p in (tmp_path / "rs_epm" / "checkpoints").iterdir() if p.name.isdigit())
  assert forked[0] == config.loss.mix_start_epoch * steps_per_epoch
  with pytest.raises(ValueError, match="Unknown mixing kinds"):
    ablate.run_ablation(config, str(tmp_path), mix_kinds=("mixup",))
