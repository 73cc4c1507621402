"""Command-line interface: ``mass``, thin over the library."""
