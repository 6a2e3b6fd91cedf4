r"""Converts dataset splits to ArrayRecord (no TensorFlow needed), e.g. for a TPU pod on gs://.

    python -m rsepm_jax.data.prepare --dataset=voc --root=/data/VOCdevkit/VOC2012 \
        --splits=train_aug,train,val --eval_splits=train,val --out=gs://bucket/rsepm_data

writes `<out>/rsepm_segmentation/voc/1.0.0/` (see `array_record.py`); train from it with the
config `data.name = "array_record"`, `data.root = <out>`, `data.dataset = "voc"`. The sources
are built by `sources.make_source` and validated as in training: a bad record stops the
conversion unless `--skip_bad_records` (then it is left out and counted).
All splits of a dataset are written in one call.
"""
import argparse
import sys

from absl import logging
import ml_collections

from rsepm_jax.data import array_record
from rsepm_jax.data import sources


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, help="Source name (data.name): voc or coco.")
  parser.add_argument("--root", required=True, help="Dataset root (local or gs://).")
  parser.add_argument("--splits", required=True, help="Comma-separated splits to convert.")
  parser.add_argument("--out", required=True, help="TFDS data_dir to write (local or gs://).")
  parser.add_argument("--eval_splits", default="",
                      help="Comma-separated splits whose masks are required.")
  parser.add_argument("--mask_dir", default=None, help="Mask directory (source default if unset).")
  parser.add_argument("--skip_bad_records", action="store_true")
  parser.add_argument("--allow_subset", action="store_true")
  parser.add_argument("--num_threads", type=int, default=16)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  data_config = ml_collections.ConfigDict({
      "name": args.dataset, "root": args.root,
      "eval_split": tuple(split for split in args.eval_splits.split(",") if split),
      "skip_bad_records": args.skip_bad_records, "allow_subset": args.allow_subset,
  })
  if args.mask_dir is not None:
    data_config.mask_dir = args.mask_dir
  splits = [split for split in args.splits.split(",") if split]
  array_record.write_array_record(
      {split: sources.make_source(data_config, split) for split in splits},
      dataset=args.dataset, data_dir=args.out, num_threads=args.num_threads)


if __name__ == "__main__":
  main(sys.argv[1:])
