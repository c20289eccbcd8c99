import sys

from hada.cli import main

sys.exit(main())
