"""`python tests/run_with_probe.py <experiment> [key=value ...]`: experiments.run with the method of
tests/method_probe.py registered (a user's own method file works the same way). A script, not
`python -c`, so that Lightning's DDP launcher can start it again for each process."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tests.method_probe  # noqa: E402,F401  (registers "probe")
from experiments.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
