"""`python -m stablerep.train ...` = `stablerep train ...`, the form torchrun launches.

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \
        -m stablerep.train --config configs/cc12m.yaml
"""

import sys

from stablerep.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], prog_name="stablerep")
