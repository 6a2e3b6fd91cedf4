"""The speed table on the smoke config: every row present, every number finite and positive."""
import json
import math

from configs import demo
from rsepm_jax import benchmark

ROWS = ("train", "mix", "eval", "pamr", "scg", "canny", "epm", "crf")


def _positive(value):
  return value is not None and math.isfinite(value) and value > 0


def test_run_on_smoke_config(tmp_path):
  rows = benchmark.run(demo.get_config("smoke"), ROWS, repeats=1, component_size=64,
                       component_batch=2, out_dir=str(tmp_path))
  assert [row["key"] for row in rows] == list(ROWS)
  by_key = {row["key"]: row for row in rows}
  for key in ROWS[:-1]:
    row = by_key[key]
    assert row["status"] == "ok", row
    for field in ("median_ms", "p10_ms", "p90_ms", "images_per_s", "compile_s", "xla_bytes",
                  "gflops", "tflops_per_s"):
      assert _positive(row[field]), (key, field, row[field])
    assert row["mfu"] is None  # no peak FLOP/s for a CPU
  assert "% of the train step" in by_key["mix"]["note"]
  crf = by_key["crf"]
  assert crf["status"] == "ok" or (crf["status"], crf["note"]) == ("n/a", "not implemented yet")

  saved = json.loads((tmp_path / "benchmark.json").read_text())
  assert [row["key"] for row in saved["rows"]] == list(ROWS)
  assert saved["device"]["backend"] == "cpu"
  table = (tmp_path / "benchmark.md").read_text()
  assert table.count("\n| ") == len(ROWS) + 1  # header and one line per row
  assert "| crf | n/a (not implemented yet)" in table or "dense CRF" in table


def test_isolated_rows_time_out_and_report():
  rows = benchmark.run_isolated(["--config=configs/demo.py:smoke"], ["crf"], row_timeout_s=120)
  assert [(row["key"], row["status"]) for row in rows] in ([("crf", "n/a")], [("crf", "ok")])
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


def test_cpu_conv_gradients_match_xla():
  """The CPU conv of models/resnet.py (kernel gradient as a matmul, the speed fix the benchmark
  measured) gives XLA's gradients up to float summation order."""
  import jax
  from jax import lax
  import jax.numpy as jnp
  import numpy as np
  from rsepm_jax.models import resnet

  rng = np.random.default_rng(0)
  for size, kernel, stride, dilation in ((9, 3, 1, 1), (9, 3, 2, 1), (8, 1, 2, 1), (11, 7, 2, 1),
                                         (10, 3, 1, 2)):
    pad = ((dilation * (kernel // 2),) * 2,) * 2
    x = jnp.asarray(rng.normal(size=(2, size, size, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)), jnp.float32)

    def loss(conv, x, w):
      return jnp.sum(jnp.sin(conv(x, w)))

    xla = jax.grad(lambda x, w: loss(lambda a, b: lax.conv_general_dilated(
        a, b, (stride, stride), pad, rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC")), x, w), (0, 1))(x, w)
    ours = jax.jit(jax.grad(lambda x, w: loss(lambda a, b: resnet.cpu_conv(
        a, b, (stride, stride), pad, rhs_dilation=(dilation, dilation)), x, w), (0, 1)))(x, w)
    np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours[1], xla[1], rtol=1e-5, atol=1e-4)
