import sys

from rayalign.cli import main

sys.exit(main())
