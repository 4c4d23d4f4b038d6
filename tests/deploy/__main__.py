import sys

from tests.deploy.run import main

sys.exit(main())
