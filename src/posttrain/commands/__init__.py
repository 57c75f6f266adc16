"""One module per CLI command: argument parsing and a call into the library."""
