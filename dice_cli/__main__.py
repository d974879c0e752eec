"""``python -m dice_cli <command> ...`` is ``dice <command> ...`` (torchrun: ``torchrun ... -m dice_cli train``)."""
from .cli import main

if __name__ == "__main__":
    main()
