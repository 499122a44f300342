"""council-fast: a fast, faithful engine for Council-GAN training and image conversion.

The public API::

    gens = council_fast.load_generators("checkpoints/01000000", config="selfie2anime", engine="fused")
    anime = council_fast.translate(gens, PIL.Image.open("me.jpg"), member=0, seed=1)

``FastGenerator`` is the generator built from the fused kernels (AdaINGen's parameters and function);
``make_trainer(config, engine="auto"|"fused"|"reference")`` builds a training engine (``why_not_fused``:
what keeps a config off the fused one).
"""
from .config import ConfigError, load_config, packaged_config
from .inference import ConvertError, Converter, Generators, load_generators, translate
from .lowering import FastGenerator
from .training import make_trainer, why_not_fused
from .version import __version__

__all__ = ["FastGenerator", "load_generators", "translate", "Generators", "Converter", "ConvertError",
           "ConfigError", "load_config", "packaged_config", "make_trainer", "why_not_fused", "__version__"]
