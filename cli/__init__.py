"""The ``ressl`` command line (installed as ``ressl.cli``)."""
