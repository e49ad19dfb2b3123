"""`python -m arzoo` is the `arzoo` command."""

from arzoo.cli.main import main

if __name__ == "__main__":
    main()
