import sys

from ds_launcher._cli import main

sys.exit(main())
