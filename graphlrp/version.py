"""graphlrp's version (also `graphlrp.__version__`); a leaf module, so the exporter and the CLI can read it
without importing the package's lazy top level."""
__version__ = "0.1.0"
