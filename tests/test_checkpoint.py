"""rsepm_jax.checkpoint: a save and restore through a relative workdir."""
import grain
import jax.numpy as jnp
import numpy as np

from rsepm_jax import checkpoint


def test_relative_workdir_saves_and_restores(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  data_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(data_iter)
  manager = checkpoint.make_manager("runs/relative")  # orbax itself wants absolute paths
  checkpoint.save(manager, 3, state, data_iter)
  manager.wait_until_finished()
  manager.close()
  assert (tmp_path / "runs/relative/checkpoints/3").is_dir()
  restored_iter = iter(grain.MapDataset.range(10).to_iter_dataset())
  manager = checkpoint.make_manager("runs/relative")
  restored = checkpoint.restore(manager, 3, {"w": jnp.zeros((2, 3)), "step": jnp.int32(0)},
                                restored_iter)
  manager.close()
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert int(restored["step"]) == 3 and next(restored_iter) == 1
