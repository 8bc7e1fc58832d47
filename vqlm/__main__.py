import sys

from vqlm.cli import main

sys.exit(main())
