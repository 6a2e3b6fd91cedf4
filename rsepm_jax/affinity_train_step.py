"""The boundary network's training step (IRNet's affinity loss; spec 9, components spec D.2).

`(state, batch, rng) -> (state, metrics)`, one `jax.jit(jax.shard_map(...))` over the 1-D "data"
mesh like `train_step.make_train_step`, with the same state, optimiser, EMA and non-finite guard
(`train_step.apply_gradients`). `batch["mask"] [b, S, S]` holds the confident labels of
`data.train_mask_dir` (0 background, c + 1 class c, 255 uncertain; `--mode=export` with
`export.protocol="confident"`); they are reduced to the stride-4 edge grid as IRNet does
(`affinity_labels.reduce_labels`), and `affinity_labels.edge_loss` (radius
`config.affinity.radius`) compares the inter-pixel affinities of the edge map with the label
pairs. The backbone gets no gradient (`AffinityNet` detaches it); its LR multipliers are 0 in
configs/voc_rw.py. Each device averages its own pairs; the loss is the mean over the devices.
"""
import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from rsepm_jax import optimizer
from rsepm_jax import train_step
from rsepm_jax.parallel import DATA_AXIS
from rsepm_jax.refine import affinity_labels


def make_train_step(model, tx, config, mesh, total_steps, steps_per_epoch):
  """Returns the jitted step of `model` (an `affinity.AffinityNet`); `state` is donated.

  `steps_per_epoch` is unused (the step has no phases); the signature is
  `train_step.make_train_step`'s.
  """
  del steps_per_epoch
  schedule = optimizer.poly_schedule(config.optim.lr, total_steps, config.optim.poly_power)

  def compute_loss(params, batch_stats, batch):
    outputs = model.apply({"params": params, "batch_stats": batch_stats},
                          train_step.model_inputs(batch), train=True)
    labels = affinity_labels.reduce_labels(batch["mask"].astype("int32"), 4)
    loss = affinity_labels.edge_loss(outputs["edge_logits"][..., 0], labels,
                                     config.affinity.radius)
    return lax.pmean(loss, DATA_AXIS), ({"affinity": loss}, batch_stats)

  def step(state, batch, rng):
    del rng  # no dropout, no random choice
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state["params"], state["batch_stats"], batch)
    return train_step.apply_gradients(state, loss, grads, batch_stats, terms, tx, config.optim,
                                      schedule)

  sharded = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)
