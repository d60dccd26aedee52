"""Make the repository root importable (the project is a set of scripts, not an installed package)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
