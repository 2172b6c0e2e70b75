"""The ``bastion`` command line: one module per command group; options in, app object out."""
