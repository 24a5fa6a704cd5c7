"""Verification: inputs drawn per input (`feeds`), onnxruntime running parent and child (`verifier`: whole, or
`regions` one changed subgraph at a time; `runtime` the sessions), the report."""

# Random input sets a verification compares on unless told otherwise (here: the CLI reads it
# without loading the verifier).
DEFAULT_TRIALS = 3
