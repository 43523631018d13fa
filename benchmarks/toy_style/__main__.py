"""``python -m benchmarks.toy_style [--workdir DIR] [--quick] [--base-only] ...``: the toy alignment testbed
(:mod:`benchmarks.toy_style.testbed`)."""

from benchmarks.toy_style.testbed import main

if __name__ == "__main__":
    main()
