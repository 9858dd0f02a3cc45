"""The `asyndgan` command (cli/main.py): it sits on top and may import any package."""
