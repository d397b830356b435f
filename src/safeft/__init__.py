"""safeft: fine-tune LLMs on domain data without losing their safety alignment."""

from .api import train
from .config import RunConfig, load_config
from .errors import SafeftError
from .methods import list_methods
from .models import load_model

__version__ = "0.1.0"
__all__ = ["RunConfig", "SafeftError", "list_methods", "load_config", "load_model", "train"]
