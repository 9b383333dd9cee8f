"""Online retraining of a ViT image classifier over a stream of corrupted domains, under a memory budget.

    accelerate launch recipes/vit_cls_online.py             # offline default: a ~0.3 M ViT, digits -> 5 corruptions
    python recipes/vit_cls_online.py --baseline none        # the source model, never adapted
    python recipes/vit_cls_online.py --model google/vit-base-patch16-224 --dataset cifar10-c --data_dir DIR
    python recipes/vit_cls_online.py --model google/vit-base-patch16-224 --random_init true   # ViT-B/16's memory and
                                                            # step times without its weights (accuracy not measured)

Every flag: --help. The logic lives in vit_online.run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout, uninstalled

from vit_online.run import main  # noqa: E402

if __name__ == "__main__":
    main()
