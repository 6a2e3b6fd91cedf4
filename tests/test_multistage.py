"""`python -m rsepm_jax.pipeline`: the chain RS+EPM -> pseudo labels -> DeepLab -> paper eval on
the synthetic data with tiny networks; an interrupted chain continues with the next stage."""
import json
import logging

import numpy as np
from PIL import Image
import pytest

from rsepm_jax import config_check
from rsepm_jax import pipeline
from rsepm_jax.configs import demo


def chain_configs():
  config = demo.get_config("smoke")
  config.data.synthetic.num_train, config.data.synthetic.num_eval = 16, 8
  config.inference.scales = (1.0, 0.5)
  config.export.crf = False  # the CRF has its own tests; it would double the export's time
  seg_config = demo.get_config("smoke")
  seg_config.data.synthetic.num_train, seg_config.data.synthetic.num_eval = 16, 8
  seg_config.model.arch = "deeplabv3plus"
  seg_config.inference.scales = (1.0,)
  seg_config.eval.crf = False
  return config, seg_config


def test_the_chain_runs_every_stage_and_continues_after_an_interruption(tmp_path, caplog):
  config, seg_config = chain_configs()
  workdir = tmp_path / "chain"
  caplog.set_level(logging.INFO)
  # The first run stops after the export, as a preempted pipeline would.
  assert pipeline.run(config, seg_config, str(workdir), ("rsepm", "export")) == {}
  assert (workdir / "rsepm" / "done.json").exists()
  labels = sorted((workdir / "rsepm" / "pseudo_labels" / "train").glob("*.png"))
  assert len(labels) == 16
  assert json.loads((workdir / "export_done.json").read_text())["pngs"] == 16
  values = np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in labels]))
  assert set(values.tolist()) <= set(range(config.data.num_classes + 1)) and values.max() > 0
  assert not (workdir / "deeplab").exists()

  caplog.clear()
  results = pipeline.run(config, seg_config, str(workdir))  # the same command again
  assert "RS+EPM training is complete" in caplog.text
  assert "the pseudo-label export is complete" in caplog.text
  done = json.loads((workdir / "deeplab" / "done.json").read_text())
  saved = json.loads((workdir / "deeplab" / "config.json").read_text())
  assert saved["data"]["train_mask_dir"] == str(workdir / "rsepm" / "pseudo_labels" / "train")
  assert results["num_images"] == 8 and 0 <= results["paper"]["miou"] <= 1
  assert (workdir / "deeplab" / "eval" / f"step_{done['step']}_paper.json").exists()

  caplog.clear()
  assert pipeline.run(config, seg_config, str(workdir)) == {}  # complete: nothing runs again
  for what in ("RS+EPM training", "DeepLab training", "the paper-protocol evaluation"):
    assert f"{what} is complete" in caplog.text


def test_the_chain_refuses_mismatched_configs(tmp_path):
  config, seg_config = chain_configs()
  seg_config.model.arch = "rsepm"
  with pytest.raises(config_check.ConfigError, match="trains deeplabv3plus or deeplabv2"):
    pipeline.run(config, seg_config, str(tmp_path))
  seg_config.model.arch, seg_config.data.train_split = "deeplabv2", "val"
  with pytest.raises(config_check.ConfigError, match="train_split='val' but the pseudo labels"):
    pipeline.run(config, seg_config, str(tmp_path))
  with pytest.raises(config_check.ConfigError, match="unknown \\['rw'\\]"):
    pipeline.run(config, chain_configs()[1], str(tmp_path), ("rw",))
