import sys

from megassm.cli import main

sys.exit(main())
