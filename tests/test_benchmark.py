"""The speed table on the smoke config: every row present, every number finite and positive."""
import json
import math

from rsepm_jax.configs import demo
from rsepm_jax import benchmark

ROWS = ("train", "mix", "eval", "pamr", "scg", "canny", "epm", "crf", "deeplab_train",
        "affinity_train", "random_walk", "msflip", "msflip_crf", "cam_train", "puzzlecam_train")
# One jitted program each: compile time, FLOPs and XLA's memory estimate.
JITTED = tuple(key for key in ROWS if key not in ("crf", "msflip", "msflip_crf"))


def _positive(value):
  return value is not None and math.isfinite(value) and value > 0


def test_run_on_smoke_config(tmp_path):
  config = demo.get_config("smoke")
  config.inference.scales = (1.0, 0.5)
  config.affinity.radius = 3  # the 8 x 8 edge grid of a 32 px crop
  rows = benchmark.run(config, ROWS, repeats=1, component_size=64, component_batch=2,
                       out_dir=str(tmp_path))
  assert [row["key"] for row in rows] == list(ROWS)
  by_key = {row["key"]: row for row in rows}
  for key in JITTED:
    row = by_key[key]
    assert row["status"] == "ok", row
    for field in ("median_ms", "p10_ms", "p90_ms", "images_per_s", "compile_s", "xla_bytes",
                  "gflops", "tflops_per_s"):
      assert _positive(row[field]), (key, field, row[field])
    assert row["mfu"] is None  # no peak FLOP/s for a CPU
  assert "% of the train step" in by_key["mix"]["note"]
  crf = by_key["crf"]
  assert crf["status"] == "ok", crf
  for key in ("msflip", "msflip_crf"):  # host loops over jitted calls: timed, no FLOPs
    row = by_key[key]
    assert row["status"] == "ok", row
    assert _positive(row["median_ms"]) and row["compile_s"] is None and row["gflops"] is None
    assert math.isclose(row["images_per_s"], 1e3 / row["median_ms"])
    assert row["name"].startswith(("multi-scale inference 1x48x64", "predict_label 1x48x64"))
    assert "first call (compiles)" in row["note"]
  assert "scales (1.0, 0.5) + flip, 4 tags, dense CRF" in by_key["msflip_crf"]["name"]

  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert [row["key"] for row in saved["rows"]] == list(ROWS)
  assert saved["device"]["backend"] == "cpu"
  table = (tmp_path / "benchmark.md").read_text()
  assert table.count("\n| ") == len(ROWS) + 1  # header and one line per row
  assert "| dense CRF 1x48x64x21, 10 iterations |" in table
  assert "| random walk 1x12x16x6, radius 5, 256 steps |" in table
  assert "DeepLabv3+ (low-level 48) train step, tiny, batch 8 x 32px" in by_key["deeplab_train"]["name"]
  assert by_key["puzzlecam_train"]["name"].startswith("Puzzle-CAM train step, tiny")
  assert by_key["puzzlecam_train"]["note"].endswith("x the CAM step")


def test_isolated_rows_time_out_and_report():
  rows = benchmark.run_isolated(["--config=configs/demo.py:smoke", "--component_size=64",
                                 "--repeats=1"], ["crf"], row_timeout_s=120)
  assert [(row["key"], row["status"]) for row in rows] == [("crf", "ok")]
  rows = benchmark.run_isolated(["--config=configs/demo.py:smoke", "--repeats=1"],
                                ["crf", "pamr"], row_timeout_s=0.5)
  assert [(row["key"], row["status"]) for row in rows] == [("crf", "timeout"), ("pamr", "timeout")]
  rows = benchmark.run_isolated(["--config=configs/demo.py:smoke"], ["crf", "canny"], budget_s=1)
  assert rows[-1]["status"] == "skipped"


def test_peak_flops_table():
  assert benchmark.peak_flops("NVIDIA H200") == 989e12
  assert benchmark.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert benchmark.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert benchmark.peak_flops("TPU v5 lite") == 197e12
  assert benchmark.peak_flops("TPU v4") == 275e12
  assert benchmark.peak_flops("cpu") is None
