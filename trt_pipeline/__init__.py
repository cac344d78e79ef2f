"""trt-pipeline: one declarative recipe from a Hugging Face checkpoint to a verified engine."""

import logging

__version__ = "0.1.0"

# Stage log files record INFO; handlers are the CLI's business (console.setup_logging).
logging.getLogger(__name__).setLevel(logging.INFO)
