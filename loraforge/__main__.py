"""`python -m loraforge ...`, which is what `accelerate launch -m loraforge train ...` runs in each process."""

from loraforge.cli import main

main(prog_name="loraforge")
