"""The config checked before a run: `validate(config)` up front, `check_saved(...)` against a checkpoint.

Every key of `rsepm_jax/configs/demo.py` has a kind (`kind_of`):
  model     changes the network or its parameter / optimiser-state shapes: refused on resume,
            --mode=eval and --mode=export unless `--allow_config_change`.
  schedule  changes the run's LR / EMA / phase schedule, its steps per epoch or its training
            images and their order: refused on resume unless `--allow_config_change`.
  safe      anything else (paths, workers, logging, loss weights, augmentation, RecurSeed and
            mixing knobs, evaluation): differences are logged at INFO.
"""
import difflib
import fnmatch
import json
import re
import sys

from absl import app
from absl import flags
from absl import logging

from rsepm_jax import inference
from rsepm_jax import paper_eval
from rsepm_jax import puzzle_train_step
from rsepm_jax import state as state_lib
from rsepm_jax import train_step
from rsepm_jax.configs import demo
from rsepm_jax.data import sources
from rsepm_jax.data import synthetic
from rsepm_jax.data import transforms
from rsepm_jax.models import backbones
from rsepm_jax.models import networks
from rsepm_jax.models import rsepm

MODEL, SCHEDULE, SAFE = "model", "schedule", "safe"
# Dotted-key patterns, first match wins; every key of configs/demo.py matches one.
_KINDS = (
    ("data.num_classes", MODEL),
    ("model.dtype", SAFE),  # compute dtype; parameters stay float32
    ("model.init_from", SAFE),  # read at initialisation only
    ("model.*_dropout", SAFE),
    ("model.*", MODEL),
    ("seed", SCHEDULE),  # data order, augmentation and dropout streams
    ("data.name", SCHEDULE),
    ("data.dataset", SCHEDULE),
    ("data.train_split", SCHEDULE),
    ("data.train_mask_dir", SCHEDULE),  # the training targets of the DeepLab networks
    ("data.synthetic.num_eval", SAFE),
    ("data.synthetic.*", SCHEDULE),  # the synthetic training images
    ("optim.momentum", SAFE),
    ("optim.nesterov", SAFE),
    ("optim.weight_decay", SAFE),
    ("optim.*", SCHEDULE),  # LR, its group multipliers, poly power, EMA decay and ramp
    ("train.global_batch_size", SCHEDULE),
    ("train.num_epochs", SCHEDULE),
    ("train.max_steps_per_epoch", SCHEDULE),
    ("loss.*_epoch", SCHEDULE),
    ("*", SAFE),
)
# Tuples of a fixed length; other tuple knobs take any length.
_TUPLE_LENGTHS = {"data.resize_range": 2, "data.color_jitter": 4, "data.synthetic.object_size": 2,
                  "model.decoder_dropout": 2}
STEPS_PER_EPOCH = "steps per epoch"  # the derived schedule entry of a checkpoint's config record
# config.export.protocol: the pseudo-label rules and "confident", IRNet's affinity labels (export)
EXPORT_PROTOCOLS = paper_eval.PROTOCOLS + ("confident",)


class ConfigError(ValueError):
  """A config value, key or change that the run refuses; the message names every key."""


def flatten(config):
  """{dotted key: leaf value} of a ConfigDict or a nested dict."""
  items = {}
  for name, value in config.items():
    if hasattr(value, "items"):
      items.update({f"{name}.{key}": leaf for key, leaf in flatten(value).items()})
    else:
      items[name] = value
  return items


def kind_of(key):
  """MODEL, SCHEDULE or SAFE for a dotted config key (see the module docstring)."""
  return next(kind for pattern, kind in _KINDS if fnmatch.fnmatchcase(key, pattern))


def unknown_key_message(key, known_keys):
  """One line: the unknown dotted `key` and the closest of `known_keys`."""
  close = difflib.get_close_matches(key, sorted(known_keys), n=1, cutoff=0.5)
  hint = f"did you mean '{close[0]}'?" if close else "every key is listed in rsepm_jax/configs/demo.py."
  return f"Unknown config key '{key}'; {hint}"


# ------------------------------------------------------------------------------- validation


def _type_problem(key, value, default):
  """What is wrong with the type of `value` given demo.py's `default`, or None."""
  def matches(item, like):
    if isinstance(like, bool) or isinstance(item, bool):
      return isinstance(item, bool) and isinstance(like, bool)
    if isinstance(like, float):
      return isinstance(item, (int, float))
    return isinstance(item, type(like))

  if isinstance(default, tuple):
    length = _TUPLE_LENGTHS.get(key)
    element = type(default[0]).__name__ if default else None
    ok = isinstance(value, (tuple, list)) and (length is None or len(value) == length) and (
        element is None or all(matches(item, default[0]) for item in value))
    if not ok:
      size = f"{length} " if length else "0 or more "
      return f"expected a tuple of {size}{element}s, like {default}"
  elif not matches(value, default):
    name = type(default).__name__
    return f"expected {'an' if name == 'int' else 'a'} {name}, like {default!r}"
  return None


def _range_problems(config, reads_data=True):
  """[(key, what is expected)] for values outside their range; types are already checked."""
  c = config
  checks = [
      ("seed", c.seed >= 0, ">= 0"),
      ("data.name", c.data.name in sources.SOURCE_NAMES, f"one of {sources.SOURCE_NAMES}"),
      ("data.root", not reads_data or c.data.name == "synthetic" or bool(c.data.root),
       f"the dataset folder (required for data.name={c.data.name!r})"),
      ("data.train_split", bool(c.data.train_split), "a split name"),
      ("data.eval_split", bool(c.data.eval_split), "a split name"),
      ("data.num_classes", c.data.num_classes >= 1, ">= 1"),
      ("data.crop_size", c.data.crop_size >= 1, ">= 1"),
      ("data.eval_size", c.data.eval_size >= 1, ">= 1"),
      ("data.num_workers", c.data.num_workers >= 0, ">= 0"),
      ("data.read_threads", c.data.read_threads >= 1, ">= 1"),
      ("data.prefetch_buffer_size", c.data.prefetch_buffer_size >= 0, ">= 0"),
      ("data.device_prefetch", c.data.device_prefetch >= 1, ">= 1"),
      ("model.arch", c.model.arch in networks.ARCHS, f"one of {networks.ARCHS}"),
      ("model.backbone", c.model.backbone in backbones.BACKBONES, f"one of {backbones.BACKBONES}"),
      ("model.backbone_width", c.model.backbone_width >= 1, ">= 1"),
      ("model.output_stride", c.model.output_stride in (8, 16), "8 or 16"),
      ("model.last_stride", c.model.last_stride in (1, 2), "1 or 2"),
      ("model.decoder_channels", c.model.decoder_channels >= 1, ">= 1"),
      ("model.low_level_channels", c.model.low_level_channels >= 1, ">= 1"),
      ("model.aspp_dilations", all(d >= 1 for d in c.model.aspp_dilations), "dilations >= 1"),
      ("model.aspp_dropout", 0 <= c.model.aspp_dropout < 1, "in [0, 1)"),
      ("model.decoder_dropout", all(0 <= p < 1 for p in c.model.decoder_dropout), "in [0, 1)"),
      ("model.init_from", not c.model.init_from or state_lib.backbone_depth(c.model.backbone),
       "empty for model.backbone='tiny' (ImageNet weights exist for the resnet / resnest ones)"),
      ("optim.lr", c.optim.lr > 0, "> 0"),
      ("optim.momentum", 0 <= c.optim.momentum < 1, "in [0, 1)"),
      ("optim.weight_decay", c.optim.weight_decay >= 0, ">= 0"),
      ("optim.poly_power", c.optim.poly_power >= 0, ">= 0"),
      ("optim.ema_decay", 0 <= c.optim.ema_decay < 1, "in [0, 1)"),
      ("optim.ema_ramp_steps", c.optim.ema_ramp_steps > 0, "> 0"),
      ("train.global_batch_size", c.train.global_batch_size >= 1, ">= 1"),
      ("train.num_epochs", c.train.num_epochs >= 1, ">= 1"),
      ("train.max_steps_per_epoch", c.train.max_steps_per_epoch >= 0, ">= 0 (0: the whole split)"),
      ("train.num_summary_images", c.train.num_summary_images >= 0, ">= 0"),
      ("train.log_every", c.train.log_every >= 1, ">= 1"),
      ("train.checkpoint_every", c.train.checkpoint_every >= 1, ">= 1"),
      ("train.max_checkpoints", c.train.max_checkpoints >= 1, ">= 1"),
      ("train.eval_every", c.train.eval_every >= 0, ">= 0 (0: only at the end)"),
      ("loss.cam_kind", c.loss.cam_kind in ("bce", "ce"), "'bce' or 'ce'"),
      ("loss.decoder_source_epoch", c.loss.decoder_source_epoch >= 0, ">= 0"),
      ("loss.decoder_source_weight", 0 <= c.loss.decoder_source_weight <= 1, "in [0, 1]"),
      ("recurseed.bg_th", 0 <= c.recurseed.bg_th <= c.recurseed.fg_th,
       f"in [0, recurseed.fg_th={c.recurseed.fg_th}]"),
      ("recurseed.uncertain", 0 <= c.recurseed.uncertain <= c.recurseed.certain,
       f"in [0, recurseed.certain={c.recurseed.certain}]"),
      ("recurseed.pamr_dilations", all(d >= 1 for d in c.recurseed.pamr_dilations), "dilations >= 1"),
      ("mix.canny_low", 0 <= c.mix.canny_low <= c.mix.canny_high,
       f"in [0, mix.canny_high={c.mix.canny_high}]"),
      ("eval.global_batch_size", c.eval.global_batch_size >= 1, ">= 1"),
      ("eval.cam_threshold_min", 0 <= c.eval.cam_threshold_min <= c.eval.cam_threshold_max,
       f"in [0, eval.cam_threshold_max={c.eval.cam_threshold_max}]"),
      ("eval.cam_threshold_max", c.eval.cam_threshold_max <= 1, "<= 1"),
      ("eval.cam_threshold_step", c.eval.cam_threshold_step > 0, "> 0"),
      ("inference.background", c.inference.background in inference.BACKGROUNDS,
       f"one of {inference.BACKGROUNDS}"),
      ("eval.protocol", c.eval.protocol in paper_eval.PROTOCOLS, f"one of {paper_eval.PROTOCOLS}"),
      ("export.bg_threshold", 0 <= c.export.bg_threshold <= 1, "in [0, 1]"),
      ("export.protocol", c.export.protocol in EXPORT_PROTOCOLS, f"one of {EXPORT_PROTOCOLS}"),
      ("affinity.fg_threshold", 0 < c.affinity.fg_threshold <= 1, "in (0, 1]"),
      ("affinity.bg_threshold", 0 <= c.affinity.bg_threshold < c.affinity.fg_threshold,
       f"in [0, affinity.fg_threshold={c.affinity.fg_threshold})"),
      ("affinity.radius", c.affinity.radius >= 2, ">= 2"),
      ("rw.radius", c.rw.radius >= 2, ">= 2"),
      ("rw.beta", c.rw.beta > 0, "> 0"),
      ("rw.exp_times", c.rw.exp_times >= 0, ">= 0"),
      ("rw.bg_threshold", 0 <= c.rw.bg_threshold <= 1, "in [0, 1]"),
      ("rw.edge_size", c.rw.edge_size >= 1, ">= 1"),
      ("rw.crf_iters", c.rw.crf_iters >= 0, ">= 0 (0: no CRF)"),
      ("inference.max_batch", c.inference.max_batch >= 1, ">= 1"),
      ("inference.stage2_merge", c.inference.stage2_merge in inference.STAGE2_MERGES,
       f"one of {inference.STAGE2_MERGES}"),
      ("inference.stage2_class_th", 0 <= c.inference.stage2_class_th <= 1, "in [0, 1]"),
  ]
  checks += [(f"loss.{name}", c.loss[name] >= 0, ">= 0") for name in (
      "cls", "seg", "cam", "mix_cls", "mix_seg", "mix_cam")]
  checks += [(f"optim.{name}", c.optim[name] >= 0, ">= 0") for name in (
      "lr_backbone_weight", "lr_backbone_bias", "lr_new_weight", "lr_new_bias")]
  checks += [(f"recurseed.{name}", 0 <= c.recurseed[name] <= 1, "in [0, 1]") for name in (
      "first_th", "second_th", "fg_th", "certain")]
  # A phase that starts past the end never runs: most likely num_epochs was lowered alone. The
  # other networks and Puzzle-CAM have no phases.
  phased = c.model.arch == "rsepm" and c.method == "rsepm"
  checks += [(f"loss.{name}", not phased or 0 <= c.loss[name] <= c.train.num_epochs,
              f"in [0, train.num_epochs={c.train.num_epochs}]")
             for name in ("rs_start_epoch", "mix_start_epoch")]
  # RecurSeed and the mixing work on the CAM grid: a crop must tile it exactly (evaluation
  # resizes the maps to the padded image, so eval_size may be any size). The DeepLab networks'
  # logits are upsampled to any crop.
  stride = rsepm.cam_stride(c.model.output_stride, c.model.last_stride)
  checks.append(("data.crop_size", c.model.arch != "rsepm" or c.data.crop_size % stride == 0,
                 f"a multiple of the CAM stride {stride} (model.output_stride x model.last_stride)"))
  puzzle = c.model.arch == "rsepm" and c.method == "puzzlecam"
  checks += [
      ("method", c.method in puzzle_train_step.METHODS, f"one of {puzzle_train_step.METHODS}"),
      ("model.with_decoder", not puzzle or not c.model.with_decoder,
       "False for method='puzzlecam' (Puzzle-CAM trains the CAM classifier alone)"),
      ("data.crop_size", not puzzle or c.data.crop_size % (2 * stride) == 0,
       f"for method='puzzlecam' a multiple of twice the CAM stride ({2 * stride}): the CAMs of the "
       "2x2 tiles must align with the crop's"),
  ]
  checks.append(("data.train_mask_dir", c.model.arch != "rsepm" or not c.data.train_mask_dir,
                 "empty for model.arch='rsepm', which trains on image tags (training masks are "
                 "for the deeplab networks)"))
  return [(key, expected) for key, ok, expected in checks if not ok]


def _constructor_problems(config):
  """Problems found by the modules' own constructors (choices and ranges they already check)."""
  builders = [
      ("recurseed", lambda: train_step.recurseed_settings(config)),
      ("mix", lambda: train_step.mix_settings(config)),
      ("train.mix_gating", lambda: train_step.resolve_mix_gating(config.train.mix_gating)),
      ("train.bn_stats", lambda: train_step.resolve_bn_stats(config.train.bn_stats)),
      ("puzzle", lambda: puzzle_train_step.puzzle_settings(config)),
      ("model", lambda: state_lib.build_model(config)),  # arch and dtype
      ("data", lambda: transforms.train_transforms(config.data)),
  ]
  if config.data.name == "synthetic":
    builders.append(("data.synthetic", lambda: synthetic.from_config(config.data, "train")))
  problems = []
  for where, build in builders:
    try:
      build()
    except (ValueError, KeyError, TypeError) as error:
      problems.append(f"config.{where}: {error}")
  return problems


def validate(config, reads_data=True):
  """Raises `ConfigError` listing every bad key, value and what was expected; else returns None.

  `reads_data=False` (--mode=predict): `data.root` may be empty.

  Types follow the defaults of configs/demo.py (ints stay ints, tuples of ints stay tuples of
  ints); then ranges, choices and sizes. Device-count divisibility is checked when the mesh
  exists (`parallel.local_batch_size`).
  """
  values, defaults = flatten(config), flatten(demo.get_config())
  problems = [unknown_key_message(key, defaults) for key in sorted(set(values) - set(defaults))]
  problems += [f"Missing config key '{key}' (default {defaults[key]!r} in configs/demo.py)."
               for key in sorted(set(defaults) - set(values))]
  for key in sorted(set(values) & set(defaults)):
    problem = _type_problem(key, values[key], defaults[key])
    if problem:
      problems.append(f"config.{key}={values[key]!r}: {problem}.")
  if not problems:  # the range checks below read values of the right type
    problems += [f"config.{key}={values[key]!r}: expected {expected}."
                 for key, expected in _range_problems(config, reads_data)]
    problems += _constructor_problems(config)
  if problems:
    raise ConfigError(f"Invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}):\n  "
                      + "\n  ".join(problems))


def check_mode(config, mode):
  """Raises `ConfigError` (one line) when `--mode=mode` cannot run `config.model.arch`.

  Every segmentation network trains and evaluates (the multi-stage ones, deeplabv3plus and
  deeplabv2, on their decoder alone); their export needs the "paper" protocol (spec 8.1, 9): the
  "single" one is RS+EPM's pseudo-label rule. The boundary network ("affinity") only trains.
  A CAM-only RS+EPM network (`model.with_decoder=False`, Puzzle-CAM) runs every mode; its export
  needs the "paper" or "confident" protocol (its multi-scale CAMs, components spec A.5): the
  "single" one reads the decoder.
  """
  arch = config.model.arch
  if arch == "rsepm" and not config.model.with_decoder and mode == "export" and (
      config.export.protocol == "single"):
    raise ConfigError(
        "--mode=export of a CAM-only network (config.model.with_decoder=False) needs "
        "--config.export.protocol=paper or confident: the 'single' protocol reads the decoder.")
  if arch == "rsepm" or arch not in networks.ARCHS:  # `validate` names an unknown arch
    return
  if arch == "affinity" and mode != "train":
    raise ConfigError(
        f"--mode={mode} of config.model.arch='affinity': the random walk's boundary network "
        "segments nothing; it trains (configs/voc_rw.py) and serves python -m rsepm_jax.pipeline.")
  if mode == "export" and config[mode].protocol == "single":
    raise ConfigError(
        f"--mode={mode} of config.model.arch={arch!r} needs --config.{mode}.protocol=paper: the "
        "'single' protocol is RS+EPM's pseudo-label rule, not this network's (spec 9).")


# ------------------------------------------------------------------------------- checkpoints


def checkpoint_record(config, steps_per_epoch):
  """The JSON saved with each checkpoint: the config and the steps per epoch it gave."""
  return {"config": json.loads(config.to_json()), STEPS_PER_EPOCH: int(steps_per_epoch)}


def differences(saved_record, config, steps_per_epoch=None):
  """[(key, kind, saved value, current value)] where the config differs from `saved_record`.

  With `steps_per_epoch`, a change of it (the split size or the batch) is a SCHEDULE entry.
  Keys that one side lacks (a knob added or removed since) count as SAFE.
  """
  saved = flatten(saved_record["config"])
  current = flatten(json.loads(config.to_json()))  # tuples as lists, like the saved JSON
  missing = "<absent>"
  found = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key, missing), current.get(key, missing)
    if old != new:
      kind = kind_of(key) if missing not in (old, new) else SAFE
      found.append((key, kind, old, new))
  if steps_per_epoch is not None and saved_record.get(STEPS_PER_EPOCH) not in (None, steps_per_epoch):
    found.append((STEPS_PER_EPOCH, SCHEDULE, saved_record[STEPS_PER_EPOCH], steps_per_epoch))
  return found


def format_differences(found):
  return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, _, old, new in found)


def check_saved(saved_record, config, where, training, allow_change, steps_per_epoch=None):
  """Compares `config` with the one saved with a checkpoint (`where` names it).

  Refuses (`ConfigError`) model-kind differences, and on `training` schedule-kind ones too,
  unless `allow_change`; those are then logged as warnings, the rest at INFO.
  Returns the refused-kind differences (for a restore error to name them).
  """
  found = differences(saved_record, config, steps_per_epoch)
  refused_kinds = (MODEL, SCHEDULE) if training else (MODEL,)
  refused = [d for d in found if d[1] in refused_kinds]
  allowed = [d for d in found if d[1] not in refused_kinds]
  if refused and not allow_change:
    what = "change the network or the training schedule" if training else "change the network"
    raise ConfigError(
        f"The config differs from the one saved with {where} in keys that {what}:\n"
        f"{format_differences(refused)}\n"
        "Run with the saved values, or pass --allow_config_change to go on with these changes "
        "(a changed network still cannot load parameters of another shape).")
  if refused:
    logging.warning("Config changes since %s, allowed by --allow_config_change:\n%s", where,
                format_differences(refused))
  if allowed:
    logging.info("Config changes since %s, allowed:\n%s", where, format_differences(allowed))
  return refused


# ------------------------------------------------------------------------------- flags


def _config_argument(argv):
  """The `--config` value in `argv` (`--config=PATH` or `--config PATH`), or None."""
  for index, arg in enumerate(argv):
    match = re.fullmatch(r"--?config(?:=(.*))?", arg)
    if match:
      return match.group(1) if match.group(1) is not None else (
          argv[index + 1] if index + 1 < len(argv) else None)
  return None


def parse_flags(argv):
  """`app.run` flags parser: absl's, but an unknown `--config.KEY=...` ends in one line.

  ml_collections raises a bare AttributeError / KeyError (a long traceback) for an override of
  a key the config lacks; this names the dotted key and the closest one and exits 1.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    path = _config_argument(argv)
    if path is None:
      raise
    known = flatten(flags.FLAGS["config"].parser.parse(path))
    prefixes = {key.rsplit(".", depth)[0] for key in known for depth in range(key.count(".") + 1)}
    overrides = [m.group(1) for m in (re.match(r"--?config\.([^=]+)", arg) for arg in argv) if m]
    unknown = [key for key in overrides if key not in known and key not in prefixes]
    if not unknown:
      raise
    sys.exit("\n".join(unknown_key_message(key, known) for key in unknown))
