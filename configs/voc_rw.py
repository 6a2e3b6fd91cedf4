"""PASCAL VOC 2012: the boundary network of the multi-stage pipeline's random walk (spec 9).

Defined in rsepm_jax/configs/voc_rw.py (installed with the package: after `pip install .`
pass that file's path to --config from any directory); this file keeps
`--config=configs/voc_rw.py` working in a checkout. Variants and the launch command are in
that module's docstring.
"""
from rsepm_jax.configs.voc_rw import get_config  # pylint: disable=unused-import
