"""MS COCO 2014: ResNet-50, the paper's settings (spec 7) on 80 classes.

Defined in rsepm_jax/configs/coco.py (installed with the package: after `pip install .` pass
that file's path to --config from any directory); this file keeps `--config=configs/coco.py`
working in a checkout. Variants and the launch command are in that module's docstring.
"""
from rsepm_jax.configs.coco import get_config  # pylint: disable=unused-import
