"""``python -m ressl`` runs the command line (also under ``torchrun``)."""

from ressl.cli.app import main

if __name__ == "__main__":
    main()
