"""The `frostline` command line: one module per subcommand."""
