import os
import sys

# the scripts live at the repository root and are imported as modules by the unit tests
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
