"""Online retraining of SAM for box-prompted masks over a stream of corrupted domains, under a memory budget; mIoU.

    python recipes/sam_seg_online.py                        # offline: tiny SAM, generated shapes -> 4 corruptions
    python recipes/sam_seg_online.py --baseline none        # the source model, never adapted
    accelerate launch recipes/sam_seg_online.py --model facebook/sam-vit-base --data_dir DIR   # DIR/images, DIR/masks
    python recipes/sam_seg_online.py --model facebook/sam-vit-base --random_init true   # SAM ViT-B's memory, no weights

Every flag: --help. The logic lives in sam_online.run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from sam_online.run import main  # noqa: E402

if __name__ == "__main__":
    main()
