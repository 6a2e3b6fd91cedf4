"""Real processes, as users run them: `python -m rsepm_jax.main` and `launch/local_processes.sh`.

- Two hosts (2 processes x 2 CPU devices, jax.distributed over localhost, gloo collectives)
  train, are preempted (SIGTERM to one process), resume, evaluate and export; the result equals
  one process with 4 devices.
- A single process stopped with SIGTERM, re-run, killed with SIGKILL, re-run, ends bit-identical
  to an uninterrupted run: parameters, optimiser state, EMA, BN statistics and data position.
- A killed process makes the other stop with an error naming it, within the heartbeat timeout.

Every run uses the same tiny config (4 steps: 2 CAM-only, 2 with RecurSeed and EdgePredictMix),
so the step compiles once per topology and then comes from the persistent compilation cache.
The tests share one xdist group: they run one after the other, never two process groups at once.
"""
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from rsepm_jax.configs import demo
from rsepm_jax import checkpoint
from test_train import _restore_latest  # pylint: disable=g-bad-import-order

pytestmark = pytest.mark.xdist_group("processes")

REPO = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {
    "data.synthetic.num_train": 16,  # 2 steps per epoch at the smoke batch of 8
    "train.num_epochs": 2,
    "train.log_every": 1,
    "train.checkpoint_every": 1,
    # A gentle LR: with the smoke LR (0.05, new layers x10) float summation-order differences
    # between gloo and in-process all-reduces grow past 1e-5 within a few steps (max-pool ties,
    # seed thresholds); at 0.005 they stay near 4e-6 over these 4 steps (1.8e-3 after 8).
    "optim.lr": 0.005,
}
TOTAL_STEPS = 4
FLAGS = ["--config=configs/demo.py:smoke"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
RUN_TIMEOUT_S = 600


def _config():
  config = demo.get_config("smoke")
  for key, value in OVERRIDES.items():
    section, name = key.rsplit(".", 1)
    config[section][name] = value
  return config


def _env(devices):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({
      "JAX_PLATFORMS": "cpu",
      "JAX_NUM_CPU_DEVICES": str(devices),
      "DEVICES_PER_PROCESS": str(devices),
      # As conftest: tiny models, so spend little time optimising, and compile each program once.
      "JAX_DISABLE_MOST_OPTIMIZATIONS": "true",
      "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "rsepm_jax_test_xla_cache"),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
      "RSEPM_HEARTBEAT_TIMEOUT": "10",
  })
  return env


def _one_process(workdir, devices=4):
  """Starts `python -m rsepm_jax.main` (train) as one process; returns the Popen."""
  with open(f"{workdir}.log", "a") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "rsepm_jax.main", f"--workdir={workdir}", *FLAGS],
        cwd=REPO, env=_env(devices), stdout=log, stderr=subprocess.STDOUT)


def _two_processes(workdir, *extra):
  """Starts `launch/local_processes.sh 2 ...`; returns (Popen, [pid of process 0, of 1])."""
  script = subprocess.Popen(
      ["bash", "launch/local_processes.sh", "2", FLAGS[0].split("=", 1)[1], str(workdir),
       *FLAGS[1:], *extra],
      cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  first_line = script.stdout.readline()
  pids = [int(p) for p in re.search(r"pids (\d+) (\d+)", first_line).groups()]
  return script, pids


def _finish(process, timeout=RUN_TIMEOUT_S):
  try:
    out, _ = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  return process.returncode, out or ""


def _log(path):
  return pathlib.Path(path).read_text()


def _wait_for_step(workdir, step, process, timeout=RUN_TIMEOUT_S):
  """Waits until `workdir/metrics.jsonl` records `step` (the run is then at `step` or later)."""
  metrics = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert process.poll() is None, "the run ended before the step the test waits for"
    if metrics.exists() and any(json.loads(line)["step"] >= step and "loss" in line
                                for line in metrics.read_text().splitlines()):
      return
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached in {timeout} s")


def _losses(workdir):
  rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {row["step"]: row["loss"] for row in rows if "loss" in row}


def _data_position(workdir, step):
  """The saved grain iterator state(s) of checkpoint `step`, by file name."""
  folder = pathlib.Path(workdir) / "checkpoints" / str(step) / checkpoint.DATA_ITER
  return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted one-process, 4-device run: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  returncode, _ = _finish(_one_process(workdir))
  assert returncode == 0, _log(f"{workdir}.log")[-3000:]
  step, state = _restore_latest(_config(), workdir)
  assert step == TOTAL_STEPS
  return workdir, state


def _assert_bit_identical(state_a, state_b):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_sigterm_then_sigkill_then_rerun_is_bit_identical_to_an_uninterrupted_run(tmp_path, reference):
  ref_dir, ref_state = reference
  workdir = tmp_path / "run"
  # SIGTERM once the first step is done: the step it stops at is saved, and the process exits 0.
  run = _one_process(workdir)
  _wait_for_step(workdir, 1, run)
  run.send_signal(signal.SIGTERM)
  returncode, _ = _finish(run)
  assert returncode == 0
  stopped = int(re.search(r"Preempted at step (\d+): checkpoint saved", _log(f"{workdir}.log")).group(1))
  assert checkpoint.make_manager(workdir).latest_step() == stopped < TOTAL_STEPS
  assert not (workdir / "done.json").exists()

  # Re-run, then SIGKILL at a random later step, after at least one more checkpoint.
  run = _one_process(workdir)
  _wait_for_step(workdir, random.Random().randint(stopped + 1, TOTAL_STEPS - 1), run)
  run.send_signal(signal.SIGKILL)
  run.wait()
  assert f"Resuming from checkpoint step {stopped}" in _log(f"{workdir}.log")
  killed_after = checkpoint.make_manager(workdir).latest_step()
  assert stopped <= killed_after < TOTAL_STEPS
  assert not (workdir / "done.json").exists()

  # Re-run to the end: the same state as the uninterrupted run, bit for bit.
  returncode, _ = _finish(_one_process(workdir))
  assert returncode == 0, _log(f"{workdir}.log")[-3000:]
  assert f"Resuming from checkpoint step {killed_after}" in _log(f"{workdir}.log")
  step, state = _restore_latest(_config(), workdir)
  assert step == TOTAL_STEPS
  _assert_bit_identical(ref_state, state)
  assert _data_position(workdir, TOTAL_STEPS) == _data_position(ref_dir, TOTAL_STEPS)
  assert json.loads((workdir / "done.json").read_text())["step"] == TOTAL_STEPS
  # Steps replayed after the kill log the same losses as the uninterrupted run.
  assert _losses(workdir) == _losses(ref_dir)


def test_two_processes_preempted_resumed_and_exported_match_one_process(tmp_path, reference):
  ref_dir, ref_state = reference
  workdir = tmp_path / "run"
  script, pids = _two_processes(workdir)
  _wait_for_step(workdir, 1, script)
  os.kill(pids[1], signal.SIGTERM)  # a preemption notice to one host only
  returncode, out = _finish(script)
  assert returncode == 0, out
  logs = [_log(f"{workdir}.process_{rank}.log") for rank in (0, 1)]
  stopped = [re.search(r"Preempted at step (\d+)", log) for log in logs]
  assert all(stopped), out
  assert stopped[0].group(1) == stopped[1].group(1)  # every process saved the same step
  assert checkpoint.make_manager(workdir).latest_step() == int(stopped[0].group(1))

  returncode, out = _finish(_two_processes(workdir)[0])
  assert returncode == 0, out
  step, state = _restore_latest(_config(), workdir)
  assert step == TOTAL_STEPS
  # Each host read its own half of every global batch: the same computation as one host with
  # 4 devices, up to the summation order of the all-reduces.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
  losses, ref_losses = _losses(workdir), _losses(ref_dir)
  assert sorted(losses) == list(range(1, TOTAL_STEPS + 1))
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [ref_losses[s] for s in sorted(losses)], atol=1e-5)
  # Only process 0 writes metrics: one row per step (and the final evaluation).
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "loss" in row] == list(range(1, TOTAL_STEPS + 1))
  final = json.loads((workdir / "eval" / f"step_{TOTAL_STEPS}.json").read_text())
  ref_final = json.loads((ref_dir / "eval" / f"step_{TOTAL_STEPS}.json").read_text())
  assert final["num_images"] == ref_final["num_images"] == 16
  assert final["cam"]["miou"] == pytest.approx(ref_final["cam"]["miou"], abs=1e-3)

  # Export: each host writes the pseudo labels of its own share of the split.
  returncode, out = _finish(_two_processes(workdir, "--mode=export")[0])
  assert returncode == 0, out
  written = [int(re.search(r"Wrote (\d+) pseudo-label PNGs", _log(f"{workdir}.process_{rank}.log")).group(1))
             for rank in (0, 1)]
  assert written == [8, 8]
  assert len(list((workdir / "pseudo_labels" / "train").glob("*.png"))) == 16


def test_a_killed_process_stops_the_other_with_an_error_naming_it(tmp_path, reference):
  del reference  # only orders this test after the compilations of the others
  workdir = tmp_path / "run"
  script, pids = _two_processes(workdir)
  _wait_for_step(workdir, 1, script)
  killed_at = time.time()
  os.kill(pids[1], signal.SIGKILL)
  returncode, out = _finish(script, timeout=120)
  stopped_after = time.time() - killed_at
  assert returncode != 0
  assert stopped_after < 60  # heartbeat timeout 10 s, plus the shutdown
  log = _log(f"{workdir}.process_0.log")
  assert "Task 1 heartbeat timeout" in log or "unhealthy (stopped sending heartbeats):\n1" in log, log[-3000:]
  assert "process 1" in out and "failed" in out


def test_bad_file_in_one_hosts_share_stops_every_host_before_training(tmp_path):
  """2 hosts split the pre-flight check (host i checks records i::2); a bad mask in host 1's
  share stops both hosts before the first step: host 1 names it, host 0 names host 1."""
  from test_bad_data import _make_tree, _mask_value_50  # pylint: disable=g-import-not-at-top
  root, workdir = tmp_path / "VOC2012", tmp_path / "run"
  _, bad_mask = _make_tree(root, bad_train=(lambda *_: None, _mask_value_50))  # record 1 only
  result = subprocess.run(
      ["bash", "launch/local_processes.sh", "2", "configs/voc.py:smoke", str(workdir),
       f"--config.data.root={root}", "--config.data.allow_subset=True",
       "--config.data.eval_size=64", "--config.train.global_batch_size=8",
       "--config.data.num_workers=0"],
      cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
  assert result.returncode != 0, result.stdout + result.stderr
  host_0, host_1 = (_log(f"{workdir}.process_{rank}.log") for rank in (0, 1))
  assert f"{bad_mask}: mask values [50]" in host_1 and str(bad_mask) not in host_0
  assert "host(s) [1] found bad data" in host_0
  assert "records of 8 (this host's share)" in host_0 + host_1
  assert "Compiling the train step" not in host_0 + host_1
  assert not (workdir / "metrics.jsonl").exists()
