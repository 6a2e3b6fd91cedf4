"""The user's mistakes that the command-line tools end with one line instead of a traceback."""
import contextlib

from rsepm_jax import config_check
from rsepm_jax import predict
from rsepm_jax.data import preflight
from rsepm_jax.data import records
from rsepm_jax.models import convert

# Errors about the user's files, whose message names the file and the problem.
INPUT_ERRORS = (records.BadRecordError, preflight.BadSplitError, FileNotFoundError,
                NotADirectoryError, convert.WeightsError, predict.UnknownClassError)


@contextlib.contextmanager
def one_line_errors(*more_input_errors):
  """Turns a config error (its message names every key), an input error or one of
  `more_input_errors` (a command's own) into `SystemExit`."""
  try:
    yield
  except config_check.ConfigError as error:
    raise SystemExit(str(error)) from None
  except INPUT_ERRORS + more_input_errors as error:  # the message names the files
    raise SystemExit(f"{type(error).__name__}: {error}") from None
