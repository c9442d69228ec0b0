"""The `loraflow` command line."""
