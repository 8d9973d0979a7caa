import sys

from unigendet.cli import main

sys.exit(main())
