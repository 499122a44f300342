"""The reference path: Council-GAN exactly as published, on any device."""
from .networks import *  # noqa: F401,F403
from .networks import __all__  # noqa: F401
