"""The command-line interface. The only place that configures logging."""
