"""The converter's version, written into every converted file (`converter_version`)."""

__version__ = "0.1.0"
