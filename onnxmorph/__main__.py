"""Entry point of `python -m onnxmorph`."""

from onnxmorph.cli import main

raise SystemExit(main())
