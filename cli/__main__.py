"""``python -m qirl.cli`` (what torchrun starts: ``torchrun --nproc_per_node N -m qirl.cli grpo ...``)."""

from .main import main

main()
