"""gkd_jax: Generalized Knowledge Distillation (Agarwal et al., ICLR 2024) in JAX/Flax."""

import logging as _logging

__version__ = "0.1.0"


def _drop_torch_absent_notice(record: _logging.LogRecord) -> bool:
  """transformers announces at import that without PyTorch its models are unavailable; gkd_jax uses only its
  tokenizers, so that notice is noise here. Drops that one record: every other transformers warning and
  error still shows."""
  return "Models won't be available" not in record.getMessage()


# Installed before any transformers import (the package imports it lazily, always after this): the filter sits
# on the library's root logger, which logs the notice itself.
_logging.getLogger("transformers").addFilter(_drop_torch_absent_notice)
