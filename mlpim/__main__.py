"""`python -m mlpim ...` is `mlpim ...`."""

from mlpim.cli import main

if __name__ == "__main__":
    main()
