"""Verification: inputs drawn per input (`feeds`), onnxruntime running parent and child (`verifier`), the report."""
