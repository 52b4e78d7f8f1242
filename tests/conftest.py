"""pytest setup: put the repository root on sys.path so the flat top-level
modules (`from evaluate import ...`) import from tests/ whatever the cwd."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
