"""The pure data-parallel training step: `(state, batch, rng) -> (state, metrics)`.

One `jax.jit(jax.shard_map(...))` over the 1-D "data" mesh. Each device computes its share of
the loss; the total is `pmean`-ed inside, so gradients of the replicated params come out
already summed (jax_conventions 5.3) and BatchNorm statistics are synchronised through
`bn_axis_name="data"`. Pixel-averaged losses are normalised by the global count of valid
pixels, so any device count gives the same result as one device.

Phases (spec 6.3) are decided inside the jitted function from the step counter, so warm-up,
RecurSeed and EdgePredictMix share one compiled step:
  epoch <  rs_start_epoch:   L = L_cls
  epoch >= rs_start_epoch:   + w_seg L_seg + w_cam L_cam on RecurSeed pseudo masks (spec 4.2)
  epoch >= mix_start_epoch:  + the same three losses on the mixed batch (spec 5.2)
The RecurSeed source switches from the CAM to the decoder at `decoder_source_epoch`; the
decoder source is the training pass's output (dropout on) or, by default, the decoder head
re-run on the same features without dropout (`config.recurseed.decoder_source_dropout`). The
RecurSeed refinement sits in a `lax.cond`; the mixed-batch pass is gated by
`config.train.mix_gating` (a `lax.cond`, or on CPU computed always and selected with `where`).
BatchNorm statistics come from both passes in turn, or from the clean pass only
(`config.train.bn_stats`).
"""
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import optax

from rsepm_jax import image_ops
from rsepm_jax import losses
from rsepm_jax import optimizer
from rsepm_jax.models import rsepm
from rsepm_jax.parallel import DATA_AXIS
from rsepm_jax.refine import edge_predict_mix
from rsepm_jax.refine import recurseed

IGNORE = 255


def model_inputs(batch):
  """Normalised images `[B, S, S, 3]` float32 with the padding outside `crop_box` set to 0."""
  image = image_ops.normalize(batch["image"])
  inside = image_ops.box_mask(batch["crop_box"], image.shape[1:3])
  return image * inside[..., None]


def recurseed_settings(config):
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
            for k, v in config.recurseed.to_dict().items()}
  return recurseed.Settings(**fields)


def mix_settings(config):
  """`MixSettings` from `config.mix`, or None when `config.mix.kind == "none"`."""
  if config.mix.kind == "none":
    return None
  return edge_predict_mix.MixSettings(**config.mix.to_dict())


def resolve_mix_gating(gating):
  """"cond" or "where" for `config.train.mix_gating` ("auto": "where" on CPU, else "cond")."""
  if gating == "auto":
    return "where" if jax.default_backend() == "cpu" else "cond"
  if gating not in ("cond", "where"):
    raise ValueError(f"config.train.mix_gating must be 'auto', 'cond' or 'where', got {gating!r}")
  return gating


def resolve_bn_stats(bn_stats):
  if bn_stats not in ("both", "clean"):
    raise ValueError(f"config.train.bn_stats must be 'both' or 'clean', got {bn_stats!r}")
  return bn_stats


def cam_stride(config):
  """Input pixels per CAM cell for `config.model` (`output_stride` x `last_stride`)."""
  return rsepm.cam_stride(config.model.output_stride, config.model.last_stride)


def _finite(tree):
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _per_device(constant):
  """Marks a constant as varying over devices, to match the other branch of a `lax.cond`."""
  return lax.pcast(constant, (DATA_AXIS,), to="varying")


def global_pixel_mean(local_mean, local_count):
  """Rescales a per-device mean so that `pmean` of it is the mean over all devices' pixels."""
  total = lax.psum(local_count, DATA_AXIS)
  return local_mean * local_count * lax.axis_size(DATA_AXIS) / jnp.maximum(total, 1.0)


def _seed_losses(outputs, seeds, loss_config):
  """L_seg (CE at stride 4) and L_cam (spec 6.2) against `seeds` `[B, h, w]`, 255 ignored."""
  valid = jnp.sum(seeds != IGNORE).astype(jnp.float32)
  seg = losses.segmentation_cross_entropy(outputs["seg_logits"], seeds)
  cams = image_ops.resize_bilinear(outputs["cams"], seeds.shape[1:3])
  cam = losses.cam_loss(cams, seeds, kind=loss_config.cam_kind, bg_logit=loss_config.cam_bg_logit)
  return global_pixel_mean(seg, valid), global_pixel_mean(cam, valid)


def mix_across_devices(rng, local, settings):
  """Mixes each local image with a partner drawn from the whole global batch.

  The permutation comes from the replicated `rng` and per-image keys from global indices, and
  partners are fetched with `all_gather`, so the mixed batch is the same however the global
  batch is split over devices.
  """
  local_size = local["images"].shape[0]
  gathered = {k: lax.all_gather(v, DATA_AXIS, tiled=True) for k, v in local.items()}
  permutation_rng, keys_rng = jax.random.split(rng)
  global_index = lax.axis_index(DATA_AXIS) * local_size + jnp.arange(local_size)
  partner_index = jax.random.permutation(permutation_rng, gathered["images"].shape[0])[global_index]
  keys = jax.vmap(lambda i: jax.random.fold_in(keys_rng, i))(global_index)
  partner = {k: v[partner_index] for k, v in gathered.items()}
  return edge_predict_mix.mix_pairs(keys, local, partner, settings)


def mix_phase_on(epoch, loss_config):
  """Whether the mixed-batch losses are on in `epoch` (they need RecurSeed's seeds)."""
  return (epoch >= loss_config.rs_start_epoch) & (epoch >= loss_config.mix_start_epoch)


def cls_loss(outputs, labels, crop_box, stride):
  """MLSM of the CAM's average inside `crop_box` (input pixels) mapped onto the CAM grid."""
  cam_box = image_ops.scale_box(crop_box, stride)
  return losses.multilabel_soft_margin(losses.masked_gap(outputs["cams"], cam_box), labels)


def step_rngs(rng, step):
  """Keys of step `step` from the replicated `rng`, inside the data-axis `shard_map`:
  {"mix": replicated (see `mix_across_devices`), "dropout", "mix_dropout": per device}."""
  mix_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, step))
  dropout_rng, mixed_dropout_rng = jax.random.split(
      jax.random.fold_in(dropout_rng, lax.axis_index(DATA_AXIS)))
  return {"mix": mix_rng, "dropout": dropout_rng, "mix_dropout": mixed_dropout_rng}


def make_loss_fns(model, config):
  """The step's per-device losses, to call inside the data-axis `shard_map`:

  compute_loss(params, batch_stats, batch, rngs, epoch)
      -> (total, (terms, batch_stats, mix_inputs, cams `[B, h, w, C]`))
  compute_mixed_loss(params, batch_stats, mixed, dropout_rng) -> (total, (terms, batch_stats))
  """
  loss_config = config.loss
  stride = cam_stride(config)
  rs_settings = recurseed_settings(config)
  bn_stats_from = resolve_bn_stats(config.train.bn_stats)

  def forward(params, batch_stats, images, dropout_rng):
    return model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": dropout_rng})

  def source_logits(params, batch_stats, outputs, decoder_on):
    """Decoder logits for the RecurSeed source, under stop_gradient: the training pass's, or the
    head re-run on its features without dropout (batch statistics, no BN update kept)."""
    if rs_settings.decoder_source_dropout:
      return outputs["seg_logits"]

    def rerun():
      variables = lax.stop_gradient({"params": params, "batch_stats": batch_stats})
      features = lax.stop_gradient(outputs["features"])
      rerun_outputs, _ = model.apply(variables, None, train=True, dropout=False,
                                     features=features, mutable=["batch_stats"])
      return rerun_outputs["seg_logits"]

    return lax.cond(decoder_on, rerun, lambda: outputs["seg_logits"])

  def compute_loss(params, batch_stats, batch, rngs, epoch):
    """Loss on the batch itself: L_cls, then RecurSeed's L_seg and L_cam once `rs_on`."""
    rs_on = epoch >= loss_config.rs_start_epoch
    decoder_on = epoch >= loss_config.decoder_source_epoch
    images = model_inputs(batch)
    outputs, mutated = forward(params, batch_stats, images, rngs["dropout"])
    terms = {"cls": cls_loss(outputs, batch["labels"], batch["crop_box"], stride)}
    if not model.with_decoder:
      return (lax.pmean(terms["cls"], DATA_AXIS),
              (terms, mutated["batch_stats"], None, outputs["cams"]))

    seg_grid = outputs["seg_logits"].shape[:3]
    no_seeds = (_per_device(jnp.full(seg_grid, IGNORE, jnp.int32)),
                _per_device(jnp.zeros(seg_grid + (outputs["seg_logits"].shape[-1],), jnp.float32)))
    seeds, probs = lax.cond(
        rs_on,
        lambda: recurseed.pseudo_mask(
            images, outputs["cams"], source_logits(params, batch_stats, outputs, decoder_on),
            outputs["features"], batch["labels"], batch["crop_box"],
            decoder_on.astype(jnp.float32) * loss_config.decoder_source_weight, rs_settings),
        lambda: no_seeds)
    batch_stats = mutated["batch_stats"]
    seg, cam = _seed_losses(outputs, seeds, loss_config)
    terms["seg"], terms["cam"] = jnp.where(rs_on, seg, 0.0), jnp.where(rs_on, cam, 0.0)
    terms["seed_valid"] = jnp.mean(seeds != IGNORE)
    total = loss_config.cls * terms["cls"] + loss_config.seg * terms["seg"] + loss_config.cam * terms["cam"]
    mix_inputs = {"images": images, "seeds": seeds, "probs": probs, "labels": batch["labels"],
                  "crop_box": batch["crop_box"]}
    if config.mix.kind in edge_predict_mix.CAM_KINDS:  # Saliency Grafting's saliency
      mix_inputs["cams"] = outputs["cams"]
    return lax.pmean(total, DATA_AXIS), (terms, batch_stats, mix_inputs, outputs["cams"])

  def compute_mixed_loss(params, batch_stats, mixed, dropout_rng):
    """The same three losses on the mixed batch (spec 5.2)."""
    outputs, mutated = forward(params, batch_stats, mixed["images"], dropout_rng)
    terms = {"mix_cls": cls_loss(outputs, mixed["labels"], mixed["crop_box"], stride)}
    terms["mix_seg"], terms["mix_cam"] = _seed_losses(outputs, mixed["seeds"], loss_config)
    total = (loss_config.mix_cls * terms["mix_cls"] + loss_config.mix_seg * terms["mix_seg"]
             + loss_config.mix_cam * terms["mix_cam"])
    new_stats = mutated["batch_stats"] if bn_stats_from == "both" else batch_stats
    return lax.pmean(total, DATA_AXIS), (terms, new_stats)

  return compute_loss, compute_mixed_loss


def apply_gradients(state, loss, grads, batch_stats, terms, tx, optim_config, schedule):
  """(new state, metrics) of one optimiser step, inside the data-axis `shard_map`.

  The update of `tx`, the new `batch_stats` and the EMA of both (`optim_config`); a step with a
  non-finite loss, gradient or result is not applied, so the state (and any checkpoint of it)
  stays good and the host loop stops with the step number. Metrics: "loss", "non_finite",
  "grad_norm", "lr" (`schedule` at the step taken) and "loss_<name>" for each of `terms`
  (per-device values, averaged here).
  """
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_step = state["step"] + 1
  decay = optimizer.ema_decay(new_step, optim_config.ema_decay, optim_config.ema_ramp_steps)
  candidate = {
      "step": new_step,
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": opt_state,
      "ema_params": optimizer.ema_update(state["ema_params"], params, decay),
      "ema_batch_stats": optimizer.ema_update(state["ema_batch_stats"], batch_stats, decay),
  }
  ok = _finite(loss) & _finite(grads) & _finite(params)
  new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), candidate, state)
  metrics = {
      "loss": loss,
      "non_finite": 1.0 - ok.astype(jnp.float32),
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state["step"]),
      **{f"loss_{name}": lax.pmean(value, DATA_AXIS) for name, value in terms.items()},
  }
  return new_state, metrics


def make_train_step(model, tx, config, mesh, total_steps, steps_per_epoch):
  """Returns the jitted step; `state` is donated."""
  optim, loss_config = config.optim, config.loss
  schedule = optimizer.poly_schedule(optim.lr, total_steps, optim.poly_power)
  mixing = mix_settings(config)
  mix_gating = resolve_mix_gating(config.train.mix_gating)
  compute_loss, compute_mixed_loss = make_loss_fns(model, config)

  def mixed_loss_and_grads(mix_on, params, batch_stats, mix_inputs, rngs):
    """(loss, terms, batch_stats, grads) of the mixed batch; zeros and `batch_stats` unchanged
    while `mix_on` is False. See `config.train.mix_gating` for how the pass is switched."""
    grad_fn = jax.value_and_grad(compute_mixed_loss, has_aux=True)

    def with_mix():
      mixed = mix_across_devices(rngs["mix"], mix_inputs, mixing)
      (loss, (terms, new_stats)), grads = grad_fn(params, batch_stats, mixed, rngs["mix_dropout"])
      return loss, terms, new_stats, grads

    def without_mix():
      terms = {name: _per_device(jnp.zeros(())) for name in ("mix_cls", "mix_seg", "mix_cam")}
      return jnp.zeros(()), terms, batch_stats, jax.tree.map(jnp.zeros_like, params)

    # Gradients are taken per pass and selected, never through the gate: a non-finite mixed
    # pass before mix_start (all-ignore seeds) cannot leak into the update through `where`.
    if mix_gating == "cond":
      return lax.cond(mix_on, with_mix, without_mix)
    return jax.tree.map(lambda on, off: jnp.where(mix_on, on, off), with_mix(), without_mix())

  def step(state, batch, rng):
    epoch = state["step"] // steps_per_epoch
    rngs = step_rngs(rng, state["step"])
    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
    (loss, (terms, batch_stats, mix_inputs, _)), grads = grad_fn(
        state["params"], state["batch_stats"], batch, rngs, epoch)
    if mixing is not None and model.with_decoder:
      mix_on = mix_phase_on(epoch, loss_config)
      mixed_loss, mixed_terms, batch_stats, mixed_grads = mixed_loss_and_grads(
          mix_on, state["params"], batch_stats, mix_inputs, rngs)
      loss = loss + mixed_loss
      grads = jax.tree.map(jnp.add, grads, mixed_grads)
      terms.update(mixed_terms)
    seed_valid = terms.pop("seed_valid", None)  # share of seed pixels not ignored
    new_state, metrics = apply_gradients(state, loss, grads, batch_stats, terms, tx, optim,
                                         schedule)
    if seed_valid is not None:
      metrics["seed_valid_fraction"] = lax.pmean(seed_valid, DATA_AXIS)
    return new_state, metrics

  sharded = jax.shard_map(
      step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
  return jax.jit(sharded, donate_argnums=0)
