"""python -m cudnn_flex demo"""

import sys

from .demo import main

if __name__ == "__main__":
    if sys.argv[1:] not in ([], ["demo"]):
        sys.exit("usage: python -m cudnn_flex [demo]")
    main()
