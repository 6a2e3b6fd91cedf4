"""The fully supervised step of the multi-stage networks (deeplabv3plus, deeplabv2; spec 9).

`(state, batch, rng) -> (state, metrics)`, one `jax.jit(jax.shard_map(...))` over the 1-D "data"
mesh like `train_step.make_train_step`, with the same state, optimiser (four LR groups: the
`backbone` submodule against the ASPP / decoder), EMA and non-finite guard
(`train_step.apply_gradients`). BatchNorm statistics are synchronised through
`bn_axis_name="data"`. The loss is the per-pixel softmax cross-entropy over the C + 1 classes
against `batch["mask"]` (the pseudo labels of `data.train_mask_dir`), 255 ignored (crop padding
included), averaged over the valid pixels of the global batch. As in the standard DeepLab
recipe, the logits (stride 4 or `output_stride`) are upsampled bilinearly (half-pixel,
`image_ops.resize_bilinear`) to the crop and the labels are used at full resolution.
"""
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rsepm_jax import image_ops
from rsepm_jax import losses
from rsepm_jax import optimizer
from rsepm_jax import train_step
from rsepm_jax.parallel import DATA_AXIS


def segmentation_loss(seg_logits, mask):
  """Per-device CE of `seg_logits [b, h, w, C + 1]` upsampled to `mask [b, S, S]` (255 ignored),
  scaled so that its `pmean` over the data axis is the mean over the global batch's valid
  pixels. Call inside the data-axis `shard_map`."""
  target = mask.astype(jnp.int32)
  logits = image_ops.resize_bilinear(seg_logits, target.shape[1:3])
  valid = jnp.sum(target != train_step.IGNORE).astype(jnp.float32)
  return train_step.global_pixel_mean(losses.segmentation_cross_entropy(logits, target), valid)


def make_train_step(model, tx, config, mesh, total_steps, steps_per_epoch):
  """Returns the jitted step of `model` (a `deeplab` network); `state` is donated.

  `steps_per_epoch` is unused (the step has no phases); the signature is
  `train_step.make_train_step`'s.
  """
  del steps_per_epoch
  schedule = optimizer.poly_schedule(config.optim.lr, total_steps, config.optim.poly_power)

  def compute_loss(params, batch_stats, batch, dropout_rng):
    outputs, mutated = model.apply(
        {"params": params, "batch_stats": batch_stats}, train_step.model_inputs(batch),
        train=True, mutable=["batch_stats"], rngs={"dropout": dropout_rng})
    seg = segmentation_loss(outputs["seg_logits"], batch["mask"])
    return lax.pmean(seg, DATA_AXIS), ({"seg": seg}, mutated["batch_stats"])

  def step(state, batch, rng):
    dropout_rng = train_step.step_rngs(rng, state["step"])["dropout"]
    (loss, (terms, batch_stats)), grads = jax.value_and_grad(compute_loss, has_aux=True)(
        state["params"], state["batch_stats"], batch, dropout_rng)
    return train_step.apply_gradients(state, loss, grads, batch_stats, terms, tx, config.optim,
                                      schedule)

  sharded = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)
