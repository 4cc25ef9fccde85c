"""divgen: diverse generation, fast. Subpackages: divgen.engine, divgen.kernels, divgen.bindings."""

__version__ = "0.1.0"
