"""``python -m onnxopt``: the same as the ``onnxopt`` command."""

import sys

from onnxopt.cli import main

sys.exit(main())
