import sys

from replfs.cli import main

sys.exit(main())
