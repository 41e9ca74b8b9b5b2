"""``python -m peftlab.cli``."""
import sys

from peftlab.cli.main import main

sys.exit(main())
