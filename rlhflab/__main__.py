import sys

from rlhflab.cli.main import main

sys.exit(main())
