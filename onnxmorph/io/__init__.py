"""Model files: the protobuf framing, checks before reading, folding, atomic saving, weights kept on disk.

`loading` is the front (load, save, normalize, digest); the rest are its parts."""
