from trainer.cli import main
from trainer.entrypoint import run_and_exit

run_and_exit(main)
