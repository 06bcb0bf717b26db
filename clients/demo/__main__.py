import sys

from clients.demo import main

sys.exit(main())
