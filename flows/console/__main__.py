import sys

from flows.console.app import main

sys.exit(main())
