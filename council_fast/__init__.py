"""council-fast: a fast, faithful engine for Council-GAN training and image conversion."""
from .config import ConfigError, load_config, packaged_config

__version__ = "0.1.0"
__all__ = ["ConfigError", "load_config", "packaged_config", "__version__"]
