"""PASCAL VOC 2012 + SBD: Puzzle-CAM, the authors' earlier method (components spec A).

Defined in rsepm_jax/configs/puzzlecam_voc.py (installed with the package: after `pip install .`
pass that file's path to --config from any directory); this file keeps
`--config=configs/puzzlecam_voc.py` working in a checkout. Variants and the launch command are in
that module's docstring.
"""
from rsepm_jax.configs.puzzlecam_voc import get_config  # pylint: disable=unused-import
