"""Training experiments that measure what morphing buys (need the `train` extra); see digits.py."""
