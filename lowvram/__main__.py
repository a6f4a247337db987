"""`python -m lowvram` runs the same CLI as the `lowvram` entry point."""

from lowvram.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
