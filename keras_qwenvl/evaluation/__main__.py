"""`python -m keras_qwenvl.evaluation ...`: see `runner.main`."""

import sys

from keras_qwenvl.evaluation.runner import main

if __name__ == "__main__":
    sys.exit(main())
