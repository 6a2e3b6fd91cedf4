"""Demo: the built-in synthetic WSSS data and a tiny ResNet, on a laptop CPU in minutes.

Defined in rsepm_jax/configs/demo.py (installed with the package: after `pip install .` pass
that file's path to --config from any directory); this file keeps `--config=configs/demo.py`
working in a checkout. Variants and the launch command are in that module's docstring.
"""
from rsepm_jax.configs.demo import get_config  # pylint: disable=unused-import
