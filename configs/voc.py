"""PASCAL VOC 2012 + SBD (train_aug): ResNet-50, the paper's settings (spec 7).

Defined in rsepm_jax/configs/voc.py (installed with the package: after `pip install .` pass
that file's path to --config from any directory); this file keeps `--config=configs/voc.py`
working in a checkout. Variants and the launch command are in that module's docstring.
"""
from rsepm_jax.configs.voc import get_config  # pylint: disable=unused-import
