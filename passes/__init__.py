"""The morph passes, one module per morph type."""
