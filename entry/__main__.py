"""``python -m gmner``: the ``gmner`` command, for environments without its console script
(a virtual environment not on PATH, ``torchrun -m``). This folder is the ``gmner`` namespace
package's own portion; the subpackages live in train/, export/, runtime/ and examples/."""

import sys

from gmner.runtime.cli import main

sys.exit(main())
