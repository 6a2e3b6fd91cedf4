"""`python -m rsepm_jax.pipeline`: the chain RS+EPM -> confident labels -> boundary network ->
random walk -> DeepLab -> paper eval on the synthetic data with tiny networks; an interrupted
chain continues with the next stage; without the random walk DeepLab takes the paper's labels."""
import json
import logging

import numpy as np
from PIL import Image
import pytest

from rsepm_jax import config_check
from rsepm_jax import pipeline
from rsepm_jax.configs import demo

NUM_TRAIN, NUM_EVAL = 16, 8


def smoke(**overrides):
  config = demo.get_config("smoke")
  config.data.synthetic.num_train, config.data.synthetic.num_eval = NUM_TRAIN, NUM_EVAL
  config.inference.scales = (1.0, 0.5)
  config.export.crf = config.eval.crf = config.affinity.crf = False  # the CRF has its own tests
  config.rw.edge_size = 32
  for key, value in overrides.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def chain_configs():
  rw_config = smoke(model__arch="affinity", affinity__radius=3, optim__lr_backbone_weight=0.0,
                    optim__lr_backbone_bias=0.0)
  return smoke(), rw_config, smoke(model__arch="deeplabv3plus", inference__scales=(1.0,))


def pngs(folder):
  files = sorted(folder.glob("*.png"))
  return files, set(np.unique(np.concatenate([np.asarray(Image.open(p)).ravel() for p in files])))


def test_the_chain_runs_every_stage_and_continues_after_an_interruption(tmp_path, caplog):
  config, rw_config, seg_config = chain_configs()
  workdir = tmp_path / "chain"
  caplog.set_level(logging.INFO)
  classes = set(range(config.data.num_classes + 1))
  # The first run stops after the boundary network, as a preempted pipeline would.
  stages = ("rsepm", "confident", "affinity")
  assert pipeline.run(config, seg_config, str(workdir), stages, rw_config) == {}
  for stage in ("rsepm", "affinity"):
    assert (workdir / stage / "done.json").exists()
  files, values = pngs(workdir / "rsepm" / "confident_labels" / "train")
  assert len(files) == NUM_TRAIN and values <= classes | {255}
  assert json.loads((workdir / "confident_done.json").read_text())["pngs"] == NUM_TRAIN
  assert not (workdir / "random_walk").exists() and not (workdir / "deeplab").exists()

  caplog.clear()
  results = pipeline.run(config, seg_config, str(workdir), rw_config=rw_config)  # the same command
  for stage in stages:
    assert f"stage {stage} is complete" in caplog.text
  files, values = pngs(workdir / "random_walk" / "train")
  assert len(files) == NUM_TRAIN and values <= classes
  saved = json.loads((workdir / "deeplab" / "config.json").read_text())
  assert saved["data"]["train_mask_dir"] == str(workdir / "random_walk" / "train")
  assert results["num_images"] == NUM_EVAL and 0 <= results["paper"]["miou"] <= 1
  step = json.loads((workdir / "deeplab" / "done.json").read_text())["step"]
  assert (workdir / "deeplab" / "eval" / f"step_{step}_paper.json").exists()
  assert not (workdir / "rsepm" / "pseudo_labels").exists()  # the random walk replaces it

  caplog.clear()
  assert pipeline.run(config, seg_config, str(workdir), rw_config=rw_config) == {}  # all done
  for stage in ("rsepm", "confident", "affinity", "random_walk", "deeplab", "eval"):
    assert f"stage {stage} is complete" in caplog.text

  # Without the random walk, the export stage writes the paper's labels for DeepLab.
  assert pipeline.run(config, seg_config, str(workdir), ("rsepm", "export")) == {}
  files, values = pngs(workdir / "rsepm" / "pseudo_labels" / "train")
  assert len(files) == NUM_TRAIN and values <= classes


def test_the_pipeline_imports_next_to_the_other_commands():
  """Its flags are defined only when run as a program: no clash with another --config."""
  import importlib  # pylint: disable=g-import-not-at-top
  for name in ("rsepm_jax.ablate", "rsepm_jax.benchmark", "rsepm_jax.pipeline"):
    importlib.reload(importlib.import_module(name))


def test_the_chain_refuses_mismatched_configs(tmp_path):
  config, rw_config, seg_config = chain_configs()
  seg_config.model.arch = "rsepm"
  with pytest.raises(config_check.ConfigError, match="trains deeplabv3plus or deeplabv2"):
    pipeline.run(config, seg_config, str(tmp_path))
  seg_config.model.arch = "deeplabv2"
  with pytest.raises(config_check.ConfigError, match="boundary network is 'affinity'"):
    pipeline.run(config, seg_config, str(tmp_path), rw_config=seg_config)
  seg_config.data.train_split = "val"
  with pytest.raises(config_check.ConfigError, match="train_split='val' but the labels"):
    pipeline.run(config, seg_config, str(tmp_path), rw_config=rw_config)
  with pytest.raises(config_check.ConfigError, match="unknown \\['rw'\\]"):
    pipeline.run(config, chain_configs()[2], str(tmp_path), ("rw",))
