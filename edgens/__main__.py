"""``python -m edgens`` runs the CLI (torchrun launches training this way)."""

from edgens.cli import main

if __name__ == "__main__":
    main()
