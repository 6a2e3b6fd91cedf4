"""MS COCO 2014: DeepLabv3+ on pseudo labels, the multi-stage pipeline's stage 2 (spec 9).

Defined in rsepm_jax/configs/coco_deeplab.py (installed with the package: after `pip install .`
pass that file's path to --config from any directory); this file keeps
`--config=configs/coco_deeplab.py` working in a checkout. Variants and the launch command are in
that module's docstring.
"""
from rsepm_jax.configs.coco_deeplab import get_config  # pylint: disable=unused-import
