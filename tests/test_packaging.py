"""pyproject.toml against the pinned requirements, and the installed package run from elsewhere.

The installed-package tests run only where `pip install .` put rsepm_jax outside this checkout
(`.ci/run` does, after the suite, with RSEPM_REQUIRE_INSTALLED=1: there they fail instead of
skipping); they start `python -m rsepm_jax.main` in a temporary directory, so the checkout is
not on the import path.
"""
import json
import os
import pathlib
import subprocess
import sys
import tomllib

from packaging import requirements
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pins(path):
  """{name: Requirement} of a requirements file's `name==version` lines (`-r` lines skipped)."""
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line and not line.startswith("-"):
      requirement = requirements.Requirement(line)
      pins[requirement.name.lower()] = requirement
  return pins


def _project():
  return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


@pytest.mark.parametrize("pinned_file,section", [("requirements.txt", None),
                                                 ("requirements-dev.txt", "dev")])
def test_pyproject_ranges_hold_the_pinned_versions(pinned_file, section):
  project = _project()
  listed = project["optional-dependencies"][section] if section else project["dependencies"]
  ranges = {r.name.lower(): r for r in map(requirements.Requirement, listed)}
  pins = _pins(REPO / pinned_file)
  assert set(ranges) == set(pins), f"pyproject.toml and {pinned_file} list different packages"
  for name, pin in pins.items():
    (version,) = [spec.version for spec in pin.specifier]
    assert ranges[name].specifier.contains(version), (
        f"{pinned_file} pins {name}=={version}, outside pyproject.toml's {ranges[name]}")
    assert ranges[name].extras == pin.extras, name


def test_pyproject_packages_carry_the_configs():
  include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
  assert include["find"]["include"] == ["rsepm_jax*"]
  assert (REPO / "rsepm_jax" / "configs" / "__init__.py").exists()
  assert set(_project()["optional-dependencies"]) == {"torch", "tensorboard", "dev"}


def _run(args, cwd, timeout=600):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
  env.update(JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed_configs(tmp_path_factory):
  """The installed package's configs directory; skips unless rsepm_jax imports from outside
  the checkout in a directory without it."""
  where = _run(["-c", "import rsepm_jax.configs as c; print(c.__path__[0])"],
               tmp_path_factory.mktemp("elsewhere"), timeout=60)
  if where.returncode != 0 or pathlib.Path(where.stdout.strip()).is_relative_to(REPO):
    message = "rsepm_jax is not installed outside the checkout (`pip install .` first)."
    if os.environ.get("RSEPM_REQUIRE_INSTALLED") == "1":
      pytest.fail(f"{message}\n{where.stdout}{where.stderr}")
    pytest.skip(message)
  return pathlib.Path(where.stdout.strip())


def test_installed_help_shows_modes_and_config_reference(installed_configs, tmp_path):
  result = _run(["-m", "rsepm_jax.main", "--help"], tmp_path, timeout=120)
  assert result.returncode in (0, 1), result.stderr  # absl exits 1 after printing --help
  for text in ("train", "eval", "export", "rsepm_jax/configs/demo.py", "--config"):
    assert text in result.stdout
  assert "Kept short" not in result.stdout


def test_installed_package_trains_and_evaluates_from_another_directory(installed_configs,
                                                                       tmp_path):
  overrides = ["--config.data.synthetic.num_train=16", "--config.train.num_epochs=1"]
  workdir = tmp_path / "work"
  train = _run(["-m", "rsepm_jax.main", f"--config={installed_configs / 'demo.py'}:smoke",
                f"--workdir={workdir}", *overrides], tmp_path)
  assert train.returncode == 0, train.stderr[-3000:]
  saved = json.loads((workdir / "eval" / "step_2.json").read_text())
  assert saved["class_names"][:3] == ["background", "disc", "square"]
  assert len(saved["decoder"]["iou"]) == 7
  # The checkout's configs path works from elsewhere too (it imports the installed configs).
  evaluation = _run(["-m", "rsepm_jax.main", f"--config={REPO / 'configs' / 'demo.py'}:smoke",
                     f"--workdir={workdir}", "--mode=eval", *overrides], tmp_path)
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  assert "decoder mIoU on val at step 2" in evaluation.stderr
