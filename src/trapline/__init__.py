"""trapline: ML jobs over camera-trap images on pull-based workers, with every image accounted for."""

__version__ = "0.1.0"
