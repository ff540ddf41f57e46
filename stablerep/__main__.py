"""`python -m stablerep ...` = the `stablerep` command (for environments without its script)."""

from stablerep.cli import main

if __name__ == "__main__":
    main(prog_name="stablerep")
