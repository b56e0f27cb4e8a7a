import sys

from diffswarm.cli import main

sys.exit(main())
