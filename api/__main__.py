"""`python -m api` is `inpaint-api`."""
import sys

from api.app import main

sys.exit(main())
